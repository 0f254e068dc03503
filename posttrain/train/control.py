"""Checkpoint cadence, resume and signals for one run directory, shared by the training loops.

    ctl = RunControl(out, cfg.checkpoint, logger)            # the loop calls, after logging each step:
    ctl.step_done("rl", step, lambda: (weights, state))       # saves every `checkpoint.every` steps, and
                                                              # on SIGINT/SIGTERM saves and stops the run
A loop that resumes reads `ctl.resumed` (the checkpoint's phase, step, weights and state) once at its start.

One process at a time: the CLI holds `lock_run_dir(out)` (an advisory lock on OUTPUT_DIR/.lock) for a run's
whole life, so a second command into the same directory stops before touching anything.

Signals: the first SIGINT or SIGTERM asks the loop to stop after the current step; the loop saves a
checkpoint and `RunInterrupted` ends the run (exit code 130). A second SIGINT exits at once
(KeyboardInterrupt); what was written before stays valid, because checkpoints are renamed into place whole.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.errors import PosttrainError, RunInterrupted  # noqa: F401 (re-exported)
from posttrain.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
)


class RunDiverged(PosttrainError):
    """Too many consecutive steps with a non-finite loss or gradient; the state was saved."""


class RunDirBusy(PosttrainError):
    """Another live process holds the run directory's lock (its files are its own: nothing was touched)."""


LOCK_FILE = ".lock"


def _writable_dir(out: Path) -> None:
    """Create `out` (and its parents); a path that is or runs through a file, or that cannot be written, is one
    line naming it."""
    for p in (out, *out.parents):  # the nearest part of the path that exists must be a directory
        if p.exists():
            if p == out and not p.is_dir():
                raise PosttrainError(f"output_dir {out} is a file, not a directory (choose another output_dir)")
            if not p.is_dir():
                raise PosttrainError(f"output_dir {out}: {p} is a file, not a directory")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PosttrainError(f"output_dir {out}: cannot create the directory ({err.strerror})") from None


@contextmanager
def lock_run_dir(out: str | Path, command: str = "") -> Iterator[Path]:
    """Hold OUTPUT_DIR/.lock, an advisory `flock`, while the block runs: a second command into the same directory
    (also with --overwrite) stops at once with one line naming the directory and the process holding it.

    The kernel drops a flock when its process dies, so a lock left by a killed run is simply taken over; the
    file's contents (pid and command of the holder) only serve the message. The directory is created here,
    which is also where an output_dir that is a file or is not writable is reported."""
    import fcntl  # noqa: PLC0415 (POSIX)

    out = Path(out)
    _writable_dir(out)
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise PosttrainError(f"output_dir {out}: cannot write there ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
        os.close(fd)
        pid, _, cmd = holder.partition(" ")
        who = f"pid {pid}: {cmd[:120]}" if cmd else f"pid {pid}" if pid else "pid unknown"
        raise RunDirBusy(f"{out} is in use by another posttrain process ({who}); wait for it to finish or choose "
                         "another output_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        yield out
    finally:
        try:
            os.ftruncate(fd, 0)  # a finished run leaves an empty lock file
        finally:
            os.close(fd)  # releases the lock


def lock_holder(out: str | Path) -> str | None:
    """The command line of the process holding OUTPUT_DIR/.lock, as `lock_run_dir` recorded it (None: none)."""
    try:
        holder = (Path(out) / LOCK_FILE).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    return holder.partition(" ")[2] or None


@dataclass
class Resumed:
    phase: str
    step: int
    weights: dict[str, dict[str, torch.Tensor]]
    state: dict
    path: Path


def find_resume_point(out: Path) -> Resumed | None:
    """The newest valid checkpoint of the run in `out` (damaged newer ones reported on stderr), or None."""
    remove_temporaries(out)
    path, skipped = latest_checkpoint(out)
    for line in skipped:
        print(f"posttrain: {line}", file=sys.stderr)
    if path is None:
        return None
    manifest, weights, state = load_checkpoint(path)
    return Resumed(manifest["phase"], manifest["step"], weights, state, path)


class RunControl:
    """Saves checkpoints on a cadence and on a signal; counts non-finite steps; knows where a resume starts."""

    def __init__(self, out: Path, every: int, keep: int, max_skipped: int, logger,
                 resumed: Resumed | None = None):
        self.out, self.every, self.keep, self.max_skipped = Path(out), every, keep, max_skipped
        self.logger = logger
        self.resumed = resumed
        self.stop_requested = False
        self.skipped_in_a_row = 0
        self.extra: dict = {}  # saved with every checkpoint (e.g. the frozen reference's hash)
        self.final_steps: dict[str, int] = {}  # a phase's last step is always saved (its result is kept)
        self.names: dict[str, str] = {}  # a loop's phase name -> the name its checkpoints carry (see `stage`)
        self._previous: dict = {}

    # signals ------------------------------------------------------------------------------------------
    def __enter__(self) -> "RunControl":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_requested = True
        print(f"\nposttrain: {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to quit at once)", file=sys.stderr)

    # resume -------------------------------------------------------------------------------------------
    def check_frozen(self, key: str, sha256: str, what: str) -> None:
        """Record a frozen model's content hash; when resuming, it must equal the one the run saved."""
        if self.resumed is not None and key in self.resumed.state and self.resumed.state[key] != sha256:
            raise PosttrainError(f"--resume: {what} changed since {self.resumed.path} was saved (sha256 "
                                 f"{self.resumed.state[key][:12]}... then, {sha256[:12]}... now)")
        self.extra[key] = sha256

    def resume_step(self, phase: str) -> Resumed | None:
        """The checkpoint to continue `phase` from, if the run resumes inside this phase."""
        phase = self.names.get(phase, phase)
        return self.resumed if self.resumed is not None and self.resumed.phase == phase else None

    def restore_phase(self, phase: str, restore: Callable[[dict, dict], object], before, progress=None):
        """(value, first step) to run `phase` from: `restore(weights, state)`'s value and the step after the
        checkpoint's when the run resumes inside this phase (the progress bar moved on to it), else (`before`, 1)."""
        resumed = self.resume_step(phase)
        if resumed is None:
            return before, 1
        if progress is not None:
            progress.update(resumed.step)
        return restore(resumed.weights, resumed.state), resumed.step + 1

    def stage(self, logger, names: dict[str, str] | None = None) -> None:
        """A multi-stage run moves on to a stage with its own metrics file (`logger`, whose length the next
        checkpoints record); `names` renames the phases of a loop run a second time (the RLHF pipeline's
        ablation runs the RL loop again, and checkpoints it as phase "ablation")."""
        self.logger, self.names = logger, dict(names or {})

    # checkpoints --------------------------------------------------------------------------------------
    @classmethod
    def for_run(cls, cfg, out: Path, logger, resumed: Resumed | None) -> "RunControl":
        """The control a recipe uses: `cfg.checkpoint`'s cadence, keep and skip limit."""
        ck = cfg.checkpoint
        ctl = cls(out, ck.every, ck.keep, ck.max_skipped_steps, logger, resumed)
        ctl.final_steps = {"sft": cfg.sft.steps, "rm": cfg.rm.steps, "dpo": cfg.dpo.steps, "rl": cfg.rl.steps}
        return ctl

    def save(self, phase: str, step: int, snapshot: Callable[[], tuple[dict, dict]]) -> Path | None:
        weights, state = snapshot()
        state = {**state, **self.extra, "metrics_offset": self.logger.offset(),
                 "skipped_in_a_row": self.skipped_in_a_row}
        return save_checkpoint(self.out, self.names.get(phase, phase), step, weights, state, keep=self.keep)

    def step_done(self, phase: str, step: int, snapshot: Callable[[], tuple[dict, dict]], force: bool = False) -> None:
        """After a step is logged: save on the cadence, at the phase's last step, when `force`d (the end of an
        RFT round), or on a pending signal (then stop the run)."""
        due = force or (self.every and step % self.every == 0) or step == self.final_steps.get(phase)
        if self.stop_requested or (self.every and due):
            path = self.save(phase, step, snapshot)
            if self.stop_requested:
                name = self.names.get(phase, phase)
                raise RunInterrupted(f"stopped after {name} step {step}; checkpoint {path}; continue with --resume")

    def record_step(self, finite: bool, phase: str, step: int, snapshot: Callable[[], tuple[dict, dict]]) -> None:
        """Count consecutive non-finite steps (skipped by the loop); after max_skipped, save and stop."""
        self.skipped_in_a_row = 0 if finite else self.skipped_in_a_row + 1
        if self.skipped_in_a_row >= self.max_skipped:
            path = self.save(phase, step, snapshot)
            saved = f"state saved in {path}; " if path is not None else ""
            raise RunDiverged(f"{self.names.get(phase, phase)} step {step}: {self.skipped_in_a_row} consecutive steps with a non-finite loss "
                              f"or gradient were skipped; stopping ({saved}lower the learning rate or check the "
                              "rewards and data)")

    def end_step(self, phase: str, step: int, finite: bool, snapshot: Callable[[], tuple[dict, dict]], progress=None,
                 **postfix: str) -> None:
        """The end of every training step, after its metrics are logged: the non-finite guard (`record_step`),
        the checkpoint on its cadence or on a pending signal (`step_done`), and the progress bar with `postfix`."""
        self.record_step(finite, phase, step, snapshot)
        self.step_done(phase, step, snapshot)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(**postfix, refresh=False)


class NoControl(RunControl):
    """For loops run without a run directory (tests, library use): never saves, resumes or catches signals; it
    still stops a run after `max_skipped` non-finite steps in a row."""

    def __init__(self, max_skipped: int = 10**9):
        super().__init__(Path("."), 0, 0, max_skipped, None)

    def __enter__(self) -> "NoControl":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def save(self, phase, step, snapshot) -> None:
        return None


def metrics_logger(out: Path, resumed: Resumed | None, cfg):
    """metrics.jsonl of the run: new, or cut back to the checkpoint's length when resuming; with the trackers
    `cfg.logging.report_to` names (train/tracking.py), which follow the file: new with it, or cut back to what it
    kept."""
    from posttrain.train.metrics import MetricsLogger, read_metrics  # noqa: PLC0415
    from posttrain.train.tracking import open_sinks  # noqa: PLC0415

    logger = MetricsLogger(out / "metrics.jsonl", resume_at=resumed.state["metrics_offset"] if resumed else None)
    try:
        logger.sinks = open_sinks(cfg, out, read_metrics(logger.path) if resumed else None)
    except BaseException:
        logger.close()
        raise
    return logger


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    out = []
    for k in keys:
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            show = lambda v: "not set" if v is None else ("{...}" if isinstance(v, dict) else repr(v))  # noqa: E731
            out.append(f"{prefix}{k} ({show(a)} in the run, {show(b)} now)")
    return out


def open_run(cfg, resume: bool = False, overwrite: bool = False) -> tuple[Path, Resumed | None]:
    """Decide how a run uses its output directory, before anything is written there.

    - resume: continue from the newest valid checkpoint (none: start from the beginning); the config must
      equal the one the run was started with (config.yaml in the directory).
      A run that finished (summary.json, no checkpoint left) has nothing to resume: refused.
    - a directory holding an unfinished run (checkpoints) without resume: refused unless overwrite, which
      deletes its checkpoints first. A finished run (no checkpoints left) is simply replaced.
    Whenever the run starts from the beginning, the old run's outputs go once the new one starts writing
    (`clear_previous_outputs`, from prepare_output_dir).
    """
    import shutil  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    from posttrain.train.checkpoint import checkpoint_root  # noqa: PLC0415

    out = Path(cfg.output_dir)
    has_checkpoints = checkpoint_root(out).is_dir() and any(checkpoint_root(out).iterdir())
    if resume and overwrite:
        raise PosttrainError("--resume and --overwrite exclude each other: --resume continues the run in "
                             f"{out}, --overwrite starts it again")
    if resume and not has_checkpoints and (out / "summary.json").is_file():
        raise PosttrainError(f"--resume: {out} holds a finished run (summary.json, no checkpoint left); nothing to "
                             "resume (pass --overwrite to run it again)")
    if resume:
        saved_path = out / "config.yaml"
        if saved_path.is_file():
            saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
            diff = _config_differences(saved, cfg.model_dump(mode="json"))
            if diff:
                raise PosttrainError(f"--resume: the config differs from the run's {saved_path}: {'; '.join(diff[:3])}"
                                     f"{' ...' if len(diff) > 3 else ''}")
        resumed = find_resume_point(out)
        if resumed is None:
            print(f"posttrain: no checkpoint in {out}; starting from the beginning", file=sys.stderr)
        else:
            print(f"posttrain: resuming from {resumed.path} ({resumed.phase} step {resumed.step})", file=sys.stderr)
        return out, resumed
    if has_checkpoints:
        if not overwrite:
            path, _ = latest_checkpoint(out)
            where = f" (checkpoint {path.name})" if path else ""
            raise PosttrainError(f"{out} holds an unfinished run{where}; pass --resume to continue it or --overwrite "
                                 "to start again")
        shutil.rmtree(checkpoint_root(out))
    return out, None


# What a run writes into its directory besides config.yaml and checkpoints/ (recipes/*.py, report*.py).
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "report.png", "rlhf.png", "bon.png", "best.jsonl", "final", "sft",
               "rm", "ppo", "ablation", "tensorboard")  # wandb/ stays: offline runs not yet uploaded


def clear_previous_outputs(cfg) -> None:
    """Before a run that starts from the beginning (no checkpoint to resume) writes its first file: delete the
    outputs of the run that was in the directory before (its summary.json, report.png, final/, ...), so that
    nothing stale sits beside the new metrics.jsonl. Only a posttrain run directory (config.yaml) is cleared,
    only the names in RUN_OUTPUTS, and never a path this run reads (model.path, a reward model, a scorer)."""
    import shutil  # noqa: PLC0415

    from posttrain.train.checkpoint import checkpoint_root  # noqa: PLC0415

    out = Path(cfg.output_dir)
    root = checkpoint_root(out)
    if not (out / "config.yaml").is_file() or (root.is_dir() and any(root.iterdir())):
        return
    reads = [Path(p).resolve() for p in (cfg.model.path, cfg.rl.reward_model_path, cfg.rft.scorer, cfg.bon.scorer)
             if p and p != "task"]
    for name in RUN_OUTPUTS:
        path = out / name
        if not (path.exists() or path.is_symlink()):
            continue
        if any(r == path.resolve() or path.resolve() in r.parents for r in reads):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def finish_run(out: Path) -> None:
    """The run completed: its checkpoints are no longer needed (final/ holds the result)."""
    import shutil  # noqa: PLC0415

    from posttrain.train.checkpoint import checkpoint_root  # noqa: PLC0415

    shutil.rmtree(checkpoint_root(out), ignore_errors=True)
