"""Where a run's metrics go besides metrics.jsonl: TensorBoard and Weights & Biases (`logging.report_to`).

metrics.jsonl is always written and stays the record a resume cuts back to (train/metrics.py); a tracker is a
sink that `MetricsLogger` hands every record to after writing its line, and the held-out sample tables
(`held_out`) that metrics.jsonl does not hold. The tag scheme (docs/metrics.md):

    scalar   "<phase>/<key>" at global step `step`   every number of a record ("rl/reward_mean", "sft/loss",
                                                     "rl/time/update"; a nested dict's keys joined with "/")
    table    "<phase>/samples" at the evaluation's step: the first logging.sample_generations held-out prompts,
             their greedy responses and rewards

TensorBoard writes one run per phase, OUTPUT_DIR/tensorboard/<phase>/, so that each phase's steps count on
their own. Like metrics.jsonl, the directory starts empty with a new run and is cut back on a resume: a phase's
writer hides what the interrupted run wrote after the checkpoint (`purge_step`, one past the phase's last step
kept in metrics.jsonl). W&B gets one run per metrics file, each phase's "<phase>/step" as its x axis (a W&B run's
own step must only grow, and phases restart at 0); a resumed run is a new W&B run.

The packages are imported only when named; one that is missing is a ConfigError at the run's start
(`require_trackers`), before any model loads.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

from posttrain.errors import ConfigError
from posttrain.train.evaluate import Evaluation, evaluate_problems

PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}


def require_trackers(report_to) -> None:
    """Each tracker named in `report_to` can be imported, or one line naming the package and the pip command."""
    import importlib  # noqa: PLC0415

    for name in report_to:
        if name not in PACKAGES:
            continue
        module, pip = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"logging.report_to names {name}, but the {module} package is not installed: {pip} "
                              f"(or remove {name} from logging.report_to)") from None


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a record, as {key: value}; nested dicts' keys joined with "/" (step and phase out)."""
    out = {}
    for key, value in record.items():
        if not prefix and key in ("step", "phase"):
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def markdown_table(rows: list[dict]) -> str:
    """Sample rows {prompt, response, reward} as a markdown table (what TensorBoard's text tab renders)."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>") if text != "" else "*(empty)*"

    lines = ["| prompt | response | reward |", "|---|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['response'])} | {r['reward']:g} |" for r in rows]
    return "\n".join(lines)


def _tag(phase: str | None, key: str) -> str:
    return f"{phase}/{key}" if phase else key


class TensorBoardSink:
    """Event files in `root`/<phase>/ through torch.utils.tensorboard (a record without a phase: in `root`).

    `kept`: on a resume, the records left in the cut-back metrics.jsonl; each phase's writer then purges what
    the interrupted run wrote after them. None: a new run, `root` is emptied first."""

    def __init__(self, root: Path, kept: list[dict] | None):
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (needs the tensorboard package)

        self.root, self._writer_class, self._writers = Path(root), SummaryWriter, {}
        if kept is None:
            shutil.rmtree(self.root, ignore_errors=True)
        self._last_step = {} if kept is None else {r.get("phase"): r["step"] for r in kept if "step" in r}
        self._resumed = kept is not None

    def _writer(self, phase: str | None):
        if phase not in self._writers:
            purge = None
            if self._resumed:  # hide the interrupted run's events after the last kept step (all, if none kept)
                purge = self._last_step[phase] + 1 if phase in self._last_step else 0
            self._writers[phase] = self._writer_class(str(self.root / phase if phase else self.root),
                                                      purge_step=purge, flush_secs=10)
        return self._writers[phase]

    def log(self, record: dict, step: int) -> None:
        phase = record.get("phase")
        writer = self._writer(phase)
        for key, value in scalars(record).items():
            writer.add_scalar(_tag(phase, key), value, step)

    def samples(self, phase: str | None, step: int, rows: list[dict]) -> None:
        self._writer(phase).add_text(_tag(phase, "samples"), markdown_table(rows), step)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def wandb_mode() -> tuple[str, str]:
    """(mode, why): WANDB_MODE when set; else offline without an API key (WANDB_API_KEY or ~/.netrc) or
    without a connection to the W&B server; else online."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    import socket  # noqa: PLC0415
    from urllib.parse import urlparse  # noqa: PLC0415

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        return "offline", "no API key (wandb login)"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return "offline", f"{host} cannot be reached"
    return "online", "API key and network"


def _netrc_has(host: str) -> bool:
    import netrc  # noqa: PLC0415

    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    """One W&B run (project `project`, files in `out`/wandb, the run config as its config), offline where
    `wandb_mode` says so; each phase's "<phase>/step" is the x axis of its metrics."""

    def __init__(self, out: Path, project: str, config: dict):
        import wandb  # noqa: PLC0415 (needs the wandb package)

        mode, why = wandb_mode()
        self._wandb, self._phases = wandb, set()
        self.run = wandb.init(project=project, dir=str(out), name=str(out), config=config, mode=mode)
        if mode == "offline":
            print(f"posttrain: wandb offline ({why}); upload it later with `wandb sync "
                  f"{Path(out) / 'wandb' / 'offline-run-*'}`", file=sys.stderr)

    def _axis(self, phase: str | None, step: int) -> dict:
        """{"<phase>/step": step}, the phase's x axis (defined the first time the phase logs)."""
        if phase is None:
            return {}
        if phase not in self._phases:
            self._phases.add(phase)
            self.run.define_metric(f"{phase}/step", hidden=True)
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
        return {f"{phase}/step": step}

    def log(self, record: dict, step: int) -> None:
        phase = record.get("phase")
        self.run.log({**self._axis(phase, step), **{_tag(phase, k): v for k, v in scalars(record).items()}})

    def samples(self, phase: str | None, step: int, rows: list[dict]) -> None:
        table = self._wandb.Table(columns=["prompt", "response", "reward"],
                                  data=[[r["prompt"], r["response"], r["reward"]] for r in rows])
        self.run.log({**self._axis(phase, step), _tag(phase, "samples"): table})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def open_sinks(cfg, out: Path, kept: list[dict] | None) -> list:
    """The trackers `cfg.logging.report_to` names, for the metrics file in `out` (`kept`: see TensorBoardSink)."""
    require_trackers(cfg.logging.report_to)
    sinks = []
    try:
        if "tensorboard" in cfg.logging.report_to:
            sinks.append(TensorBoardSink(Path(out) / "tensorboard", kept))
        if "wandb" in cfg.logging.report_to:
            sinks.append(WandbSink(Path(out), cfg.logging.wandb_project, cfg.model_dump(mode="json")))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def log_samples(logger, phase: str, step: int, rows: list[dict]) -> None:
    """Send sample rows to the logger's trackers (a logger without `log_samples`, e.g. a test's list, skips them)."""
    if rows and hasattr(logger, "log_samples"):
        logger.log_samples(phase, step, rows)


def held_out(cfg, model, tokenizer, task, logger, phase: str, step: int) -> Evaluation:
    """Greedy evaluation on the task's held-out problems (train/evaluate.py `evaluate_problems`); the first
    `logging.sample_generations` of them go to the trackers as a table. -> the Evaluation (`.accuracy`)."""
    ev = evaluate_problems(model, tokenizer, task, task.eval_problems, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    log_samples(logger, phase, step, ev.samples(cfg.logging.sample_generations))
    return ev
