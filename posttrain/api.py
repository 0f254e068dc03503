"""The Python API: every command as a function. The command line builds a config and calls `run` too.

    import posttrain

    def exact_match(prompts, completions, answer, **_):
        return [float(answer_ in c) for c, answer_ in zip(completions, answer)]

    result = posttrain.fit("grpo", model="models/smollm2-135m-instruct", dataset="data.jsonl",
                             reward_funcs=[exact_match], rl={"steps": 20}, output_dir="runs/mine")
    result.summary["rl_accuracy"], result.model_dir, result.metrics[-1]

`fit(command, config=None, **arguments)`: `command` is sft, rm, rl, dpo, rft or bon, or an RL preset name
(grpo, ppo, dr_grpo, ...: `rl` with `rl.preset`); `config` a YAML path or a dict in the config's layout (the
embedded defaults when None); the keywords below override it, and each config section by name takes a dict
(`rl={"steps": 20}`, `task={"num_eval": 64}`), as do dotted `overrides={"rl.lr": 1e-4}`.

- `dataset` / `eval_dataset`: a JSONL path, a `datasets.Dataset`, or a list of dicts. For sft, rl, rft and bon
  it is the custom task's rows (`task.name: custom`, prompts in `task.prompt_field` or a `messages` column, every
  other column passed to the reward functions by name); for dpo and rm, preference pairs (`prompt`, `chosen`,
  `rejected`). Rows given in memory are written to OUTPUT_DIR/data/*.jsonl first, so config.yaml names a file
  and the same run can be repeated from the command line.
- `reward_funcs`: callables `fn(prompts, completions, **columns) -> list[float | None]` or specs
  ('module:function'); `reward_weights` one weight each.

It returns a `Result` (output directory, summary.json's contents, the config). Errors are the same exceptions
the command line prints in one line (posttrain.errors.PosttrainError and subclasses).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import RunConfig, build_config, merge_trees, read_yaml
from posttrain.errors import ConfigError, PosttrainError
from posttrain.presets import PRESETS

# command -> (module, function) of the recipe it runs: each takes the resolved config (and --resume/--overwrite)
RECIPES = {"sft": ("posttrain.recipes.sft", "run_sft"), "rm": ("posttrain.recipes.reward_model", "run_rm"),
           "rl": ("posttrain.recipes.rl", "run_rl"), "dpo": ("posttrain.recipes.dpo", "run_dpo"),
           "bon": ("posttrain.recipes.best_of_n", "run_bon"), "rft": ("posttrain.recipes.rft", "run_rft")}
RESUMABLE = ("sft", "rm", "rl", "dpo", "rft")  # bon trains nothing
PAIR_COMMANDS = {"dpo": "dpo", "rm": "rm"}  # a dataset of preference pairs goes to dpo.data / rm.data


@dataclass(frozen=True)
class Result:
    """What a run left: `output_dir` (config.yaml, metrics.jsonl, report.png, final/), summary.json's contents."""

    output_dir: Path
    summary: dict
    config: RunConfig

    @property
    def model_dir(self) -> Path:
        return self.output_dir / "final"

    @property
    def metrics(self) -> list[dict]:
        from posttrain.train.metrics import read_metrics  # noqa: PLC0415

        return read_metrics(self.output_dir / "metrics.jsonl")


def _remove_partial_output(out: Path, existed: bool) -> None:
    """A user error leaves nothing behind: delete the output directory this command created, unless it holds
    a checkpoint (a run stopped mid-way keeps its state)."""
    import shutil  # noqa: PLC0415

    if existed or not out.is_dir():
        return
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)


def execute(cfg: RunConfig, job: Callable[[], object], holder: str, before: Callable[[], None] | None = None):
    """Run `job` holding OUTPUT_DIR's lock (posttrain/train/control.py: `lock_run_dir`, `holder` names this
    process to a second one) inside model.dtype's precision; `before` runs first under the lock (writing the
    rows given in memory). A user error deletes the output directory if this call created it and it holds no
    checkpoint."""
    from posttrain.models.precision import precision  # noqa: PLC0415
    from posttrain.train.control import lock_run_dir  # noqa: PLC0415

    out = Path(cfg.output_dir)
    existed = out.exists()
    with lock_run_dir(out, holder):  # before anything is touched
        try:
            if before is not None:
                before()
            with precision(cfg.model):  # model.dtype: bf16 autocast, or nothing for float32
                return job()
        except (PosttrainError, FileNotFoundError):
            _remove_partial_output(out, existed)  # while the lock is held: no other run is in there
            raise


def check_command(command: str, cfg: RunConfig) -> None:
    """backend ray runs the RL loop only; only sft, rl and the demo honour model.device."""
    if cfg.backend != "local" and command != "rl":
        raise ConfigError(f"backend {cfg.backend} runs only posttrain rl; posttrain {command} runs in one "
                          "process (remove backend=ray)")
    if cfg.model.device != "cpu" and command not in DEVICE_COMMANDS:
        raise ConfigError(f"model.device={cfg.model.device}: posttrain {command} runs on the CPU only for now "
                          f"(model.device is honoured by {', '.join(DEVICE_COMMANDS)}); remove model.device")


DEVICE_COMMANDS = ("sft", "rl", "demo")  # the commands that honour model.device (the rest run on the CPU)


def run(command: str, cfg: RunConfig, resume: bool = False, overwrite: bool = False, holder: str | None = None,
        before: Callable[[], None] | None = None) -> dict:
    """Run one command (a key of RECIPES) on a validated config; its summary."""
    import importlib  # noqa: PLC0415 (a command imports only its own recipe)

    if command not in RECIPES:
        raise ConfigError(f"unknown command {command!r}; the commands are {', '.join(RECIPES)}")
    check_command(command, cfg)
    module, function = RECIPES[command]
    flags = {"resume": resume, "overwrite": overwrite} if command in RESUMABLE else {}
    if not flags and (resume or overwrite):
        raise ConfigError(f"{command} trains nothing: it has no resume or overwrite")
    recipe = getattr(importlib.import_module(module), function)
    return execute(cfg, lambda: recipe(cfg, **flags), holder or f"posttrain.fit({command!r})", before)


def _rows(data, what: str) -> list[dict] | None:
    """A dataset given in memory as a list of dicts (None for a path)."""
    if isinstance(data, (str, Path)):
        return None
    if hasattr(data, "to_list"):  # datasets.Dataset
        data = data.to_list()
    if not isinstance(data, Iterable) or isinstance(data, Mapping):
        raise ConfigError(f"{what}: expected a JSONL path, a datasets.Dataset or a list of dicts, got "
                          f"{type(data).__name__}")
    rows = list(data)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ConfigError(f"{what}[{i}]: expected a dict, got {type(row).__name__}")
    if not rows:
        raise ConfigError(f"{what}: no rows")
    return [dict(r) for r in rows]


def _write_rows(path: Path, rows: list[dict], what: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    except TypeError as exc:
        raise ConfigError(f"{what}: a row is not JSON-serialisable ({exc})") from None
    path.write_text(text, encoding="utf-8")


def _near(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def fit(command: str = "rl", config: str | Path | Mapping | None = None, *,
        model: str | Path | Mapping | None = None, dataset=None, eval_dataset=None,
        reward_funcs: Iterable | None = None, reward_weights=None, output_dir: str | Path | None = None,
        seed: int | None = None, resume: bool = False, overwrite: bool = False, overrides: Mapping | None = None,
        **sections) -> Result:
    """Run `command` (see the module docstring) and return its Result."""
    from posttrain.rewards.resolve import inline_spec  # noqa: PLC0415

    if command in PRESETS:
        sections.setdefault("rl", {})
        sections["rl"] = {**sections["rl"], "preset": command}
        command = "rl"
    if command not in RECIPES:
        raise ConfigError(f"unknown command {command!r}; the commands are {', '.join(RECIPES)} and the RL presets "
                          f"{', '.join(PRESETS)}")
    data = dict(read_yaml(config) if isinstance(config, (str, Path)) or config is None else config)
    tree: dict = {}
    for name, value in sections.items():  # rl={"steps": 20}, threads=1
        if name not in RunConfig.model_fields:
            raise ConfigError(f"fit(): unexpected argument {name!r} (the config's keys are "
                              f"{', '.join(RunConfig.model_fields)}){_near(name, RunConfig.model_fields)}")
        tree[name] = dict(value) if isinstance(value, Mapping) else value
    for key, value in (overrides or {}).items():
        _set(tree, key, value)
    out = Path(output_dir or tree.get("output_dir") or data.get("output_dir") or f"runs/{command}_api")
    tree["output_dir"] = str(out)
    if isinstance(model, Mapping):  # the model section: {"path": ..., "dtype": ...}
        tree["model"] = {**tree.get("model", {}), **model}
    elif model is not None:
        _set(tree, "model.path", str(model))
    if seed is not None:
        tree["seed"] = seed
    writes: list[tuple[Path, list[dict], str]] = []
    for arg, value, split in (("dataset", dataset, "train"), ("eval_dataset", eval_dataset, "eval")):
        if value is None:
            continue
        rows = _rows(value, arg)
        path = str(value) if rows is None else str(out / "data" / f"{split}.jsonl")
        if rows is not None:
            writes.append((Path(path), rows, arg))
        if command in PAIR_COMMANDS:
            _set(tree, f"{PAIR_COMMANDS[command]}.{'data' if split == 'train' else 'eval_data'}", path)
        else:
            _set(tree, "task.path" if split == "train" else "task.eval_path", path)
            if split == "train" and "name" not in tree.get("task", {}) and "name" not in data.get("task", {}):
                _set(tree, "task.name", "custom")
    if reward_funcs is not None:
        _set(tree, "rl.reward_funcs", [f if isinstance(f, str) else inline_spec(f) for f in reward_funcs])
    if reward_weights is not None:
        _set(tree, "rl.reward_weights", list(reward_weights))
    source = str(config) if isinstance(config, (str, Path)) else None  # errors name the file, or fit()
    cfg = build_config(merge_trees(data, tree), source=source)

    def write_data() -> None:
        for path, rows, arg in writes:
            _write_rows(path, rows, arg)

    summary = run(command, cfg, resume, overwrite, before=write_data)
    return Result(out, dict(summary or {}), cfg)


def eval_config(model: str | Path, config: str | Path | Mapping | None = None, task: str | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """The config `posttrain eval` evaluates with: `config` (default: the run's config.yaml when `model` is a
    run's final/ directory, else the embedded defaults), its task replaced by `task` when that names another
    one, dotted `overrides` on top, and model.path = `model`."""
    model = Path(model)
    if config is None and (model.parent / "config.yaml").is_file() and model.name == "final":
        config = model.parent / "config.yaml"
    data = dict(read_yaml(config) if isinstance(config, (str, Path)) or config is None else config)
    if task is not None and data.get("task", {}).get("name", "arithmetic") != task:
        data["task"] = {"name": task}  # the run's task fields belong to its own task
    data["model"] = {**data.get("model", {}), "path": str(model)}
    source = str(config) if isinstance(config, (str, Path)) else None
    return build_config(data, overrides, source=source)


def evaluate(model: str | Path, config: str | Path | Mapping | None = None, *, task: str | None = None,
             samples: int = 0, output: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """`posttrain eval`: greedy held-out accuracy of the model directory `model` (pass@k and majority vote
    with `samples` > 0) on `task` (see `eval_config`); the results, written as JSON to `output` when given."""
    from posttrain.recipes.evaluate import run_eval  # noqa: PLC0415

    if samples < 0:
        raise ConfigError(f"--samples must be >= 0, got {samples}")
    cfg = eval_config(model, config, task, overrides)
    check_command("eval", cfg)
    from posttrain.models.precision import precision  # noqa: PLC0415

    with precision(cfg.model):
        return run_eval(cfg, samples, output)


__all__ = ["RECIPES", "Result", "evaluate", "execute", "fit", "run"]
