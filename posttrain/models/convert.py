"""`posttrain convert GGUF_FILE OUT_DIR`: a GGUF file to a plain Hugging Face model directory.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=name)`), dequantizes every tensor to float and
builds the tokenizer, with its chat template, from the file's metadata; but the model it returns keeps the GGUF
quantizer and refuses `save_pretrained`. So the same architecture is built again from the config without its
quantization entry, the dequantized state dict is loaded into it (strict: every tensor, tied embeddings kept
tied), and the directory is written: config.json, model.safetensors (float32), generation_config.json,
tokenizer.json, tokenizer_config.json and chat_template.jinja. It loads with `AutoModelForCausalLM` and
`AutoTokenizer` and needs no GGUF package.

The weights are the file's quantized values in float32 (for a Q4_1 file: 4-bit values times a per-block scale
plus offset), so the converted model computes what the GGUF model computes, not what the checkpoint it was
quantized from computes.

The packages this needs (`gguf`, `accelerate`: the extra `real`) are imported here only.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import ModelLoadError, PosttrainError

EXTRA = "real"
NEEDS = ("gguf", "accelerate")


@dataclass(frozen=True)
class Converted:
    """What `convert_gguf` wrote: the directory and a few facts for the one-line summary."""

    out_dir: Path
    architecture: str  # e.g. LlamaForCausalLM
    parameters: int
    vocab_size: int
    chat_template: bool
    seconds: float

    def summary(self) -> str:
        return (f"wrote {self.out_dir}: {self.architecture}, {self.parameters / 1e6:.1f}M parameters (float32), "
                f"vocabulary {self.vocab_size}, chat template {'yes' if self.chat_template else 'no'}, "
                f"in {self.seconds:.0f} s")


def require_extra() -> None:
    """One line naming the extra when `gguf` or `accelerate` is not installed."""
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise PosttrainError(f"converting a GGUF file needs the package(s) {', '.join(missing)}: "
                             f"pip install 'posttrain[{EXTRA}]' (or make real-model)")


def check_gguf(path: Path) -> None:
    """A file that starts with the GGUF magic bytes (the cheap check; a truncated or corrupt file is found when
    transformers reads it, in `load_gguf`)."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the bytes GGUF)")


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PosttrainError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PosttrainError(f"{out} exists and is not empty (pass --overwrite to replace it)")


def load_gguf(path: Path):
    """(model, tokenizer) as transformers loads the GGUF file: float32, dequantized, quantizer attached."""
    import struct

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # a truncated file: struct.error in the header, ValueError where a tensor runs past the end
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, IndexError, OSError, EOFError, struct.error, NotImplementedError,
            RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(f"{path}: transformers cannot read this GGUF file, truncated or not supported "
                             f"({reason})") from None
    return model.eval(), tokenizer


def plain_model(gguf_model):
    """The same architecture without the GGUF quantizer, holding the same (dequantized) tensors."""
    import torch

    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)  # GGUF general.name, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2"
    cfg["architectures"] = [type(gguf_model).__name__]
    config = type(gguf_model.config).from_dict(cfg)
    config.dtype = torch.float32
    model = type(gguf_model)(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if config.tie_word_embeddings:  # SmolLM2: lm_head is embed_tokens; one tensor in the safetensors file
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.eval()


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, overwrite: bool = False) -> Converted:
    """Convert `gguf_file` into the Hugging Face directory `out_dir`.

    The directory is written next to `out_dir` under a temporary name and renamed when complete, so a failed or
    interrupted conversion leaves nothing half-written (and an existing `out_dir` is replaced only then)."""
    start = time.perf_counter()
    src, out = Path(gguf_file), Path(out_dir)
    require_extra()
    check_gguf(src)
    _check_out_dir(out, overwrite)
    gguf_model, tokenizer = load_gguf(src)
    model = plain_model(gguf_model)
    del gguf_model
    tokenizer.model_max_length = model.config.max_position_embeddings
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.converting"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Converted(out, type(model).__name__, sum(p.numel() for p in model.parameters()),
                     model.config.vocab_size, tokenizer.chat_template is not None, time.perf_counter() - start)
