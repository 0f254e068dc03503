"""Atomic checkpoints with a checksum manifest, and finding the newest valid one.

    <run>/checkpoints/000012-rl-000040/     one checkpoint: sequence number, phase, step
        <model>.safetensors                  trainable weights (policy, critic), one file per model
        state.pt                             everything else: optimizer/scheduler states, RNG states, data
                                             position, counters, metrics.jsonl offset (torch.load weights_only)
        manifest.json                        written last: sha256 and size of every file above

A checkpoint is written into `checkpoints/.tmp-<name>-<pid>`, every file fsynced, then the directory is
renamed into place (atomic on POSIX) and its parent fsynced, so a crash at any moment leaves either the
complete new checkpoint or none. Only the newest `keep` are kept. A checkpoint whose manifest is missing or
does not match its files (truncated, a flipped byte) is reported in one line and skipped for the previous.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from posttrain.models.adapters import load_trainable_state_dict, trainable_state_dict

FORMAT = 1
MANIFEST = "manifest.json"
STATE = "state.pt"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _entries(root: Path) -> list[Path]:
    """Checkpoint directories (not temporaries), oldest first by sequence number."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name[:6].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[:6]))


def next_sequence(run_dir: str | Path) -> int:
    entries = _entries(checkpoint_root(run_dir))
    return int(entries[-1].name[:6]) + 1 if entries else 1


def save_checkpoint(run_dir: str | Path, phase: str, step: int, weights: dict[str, dict[str, torch.Tensor]],
                    state: dict, keep: int = 2) -> Path:
    """Write one checkpoint atomically and delete all but the newest `keep`; return its directory.

    weights: {model name: state_dict} of the trainable models. state: anything `torch.load(weights_only=True)`
    reads back (tensors, numbers, strings, lists, tuples, dicts).
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    seq = next_sequence(run_dir)
    name = f"{seq:06d}-{phase}-{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = []
    for model_name, sd in weights.items():
        path = tmp / f"{model_name}.safetensors"
        # clone: tied weights share storage, which safetensors refuses; both keys load back into the model
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path))
        files.append(path)
    torch.save(state, tmp / STATE)
    files.append(tmp / STATE)
    for path in files:
        _fsync_file(path)
    manifest = {"format": FORMAT, "sequence": seq, "phase": phase, "step": step,
                "files": {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    final = root / name
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in _entries(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | Path) -> str | None:
    """None if every file matches the manifest; otherwise what is wrong, in a few words."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (incomplete write)"
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if manifest.get("format") != FORMAT:
        return f"format {manifest.get('format')!r}, expected {FORMAT}"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
        if _sha256(f) != meta["sha256"]:
            return f"{name} does not match its sha256 checksum (corrupted)"
    return None


def latest_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and one line for each newer one that did not (skipped)."""
    skipped = []
    for path in reversed(_entries(checkpoint_root(run_dir))):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append(f"checkpoint {path} is invalid ({problem}); using the previous one")
    return None, skipped


def load_checkpoint(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict]:
    """(manifest, {model name: state_dict}, state) of a verified checkpoint directory."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    weights = {name[: -len(".safetensors")]: load_file(str(path / name))
               for name in manifest["files"] if name.endswith(".safetensors")}
    state = torch.load(path / STATE, weights_only=True)
    return manifest, weights, state


def remove_temporaries(run_dir: str | Path) -> None:
    """Delete half-written checkpoint directories left by a crash (they never count as checkpoints)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def global_rng_state() -> dict:
    """The process-wide RNG states: Python's `random`, NumPy's legacy global and torch's CPU generator."""
    import random  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]}


def set_global_rng_state(state: dict) -> None:
    import random  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from posttrain.data.sampling import as_random_state  # noqa: PLC0415

    random.setstate(as_random_state(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def weights_sha256(model_dir: str | Path) -> str:
    """One sha256 over a model directory's weight files (*.safetensors, *.bin, sorted by name)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted([*model_dir.glob("*.safetensors"), *model_dir.glob("*.bin")]):
        h.update(f.name.encode())
        h.update(_sha256(f).encode())
    return h.hexdigest()


def load_weights_into(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Load `model_dir/model.safetensors` into `model` in place (tied weights may be absent from the file)."""
    sd = load_file(str(Path(model_dir) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if getattr(model.config, "tie_word_embeddings", False) and "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{model_dir}: weights do not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {unexpected[:3]})")


def training_snapshot(key: str, model, optimizer, scheduler, batches, **extra) -> tuple[dict, dict]:
    """({key: weights}, state) of a supervised loop (sft, rm, dpo): optimizer, schedule, data position and the
    global RNGs, plus `extra` (the last evaluation): everything its resume needs to continue exactly."""
    return {key: trainable_state_dict(model)}, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                       "batches": batches.state_dict(), "global_rng": global_rng_state(), **extra}


def restore_training(key: str, model, optimizer, scheduler, batches, weights: dict, snap: dict) -> dict:
    """Load a `training_snapshot` into freshly set-up state; returns the snapshot (for its `extra` entries)."""
    load_trainable_state_dict(model, weights[key])
    optimizer.load_state_dict(snap["optimizer"])
    scheduler.load_state_dict(snap["scheduler"])
    batches.load_state_dict(snap["batches"])
    set_global_rng_state(snap["global_rng"])
    return snap
