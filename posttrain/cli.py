"""Command line: `posttrain demo|sft|rm|rl ...`, each subcommand a plain recipe function.

Every user error (bad argument, config, path, data) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="posttrain", description="Post-train language models with RL.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="build a tiny model, SFT it, then GRPO it on built-in arithmetic")
    demo.add_argument("--output-dir", default=None, help="run directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    demo.add_argument("--config", default=None, help="YAML config to start from (default: embedded)")
    demo.add_argument("--pipeline", choices=("grpo", "rlhf"), default="grpo",
                      help="grpo: SFT then GRPO with the verifier (default); rlhf: SFT, reward model, PPO "
                      "against the reward model, and the same PPO without KL penalty and ptx loss")
    demo.add_argument("--no-ablation", action="store_true",
                      help="rlhf: skip the second PPO run (beta = 0, lambda_ptx = 0)")
    demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.steps=100")
    for name, text in (("sft", "supervised fine-tuning"), ("rm", "reward model from preference pairs"),
                       ("rl", "online RL: GRPO and family, or PPO with a critic and a reward model")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.lr=1e-4")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from posttrain.config import load_config
    from posttrain.errors import PosttrainError

    try:
        if args.command == "demo":
            extra = [f"output_dir={json.dumps(args.output_dir)}"] if args.output_dir else []  # a path, not YAML
            extra += [f"seed={args.seed}"] if args.seed is not None else []
            if args.pipeline == "rlhf":
                from posttrain.config import read_yaml
                from posttrain.recipes.pipeline import rlhf_config, run_rlhf

                cfg, ablation = rlhf_config(read_yaml(args.config), [*args.overrides, *extra])
                run_rlhf(cfg, None if args.no_ablation else ablation)
            else:
                cfg = load_config(args.config, [*args.overrides, *extra])
                from posttrain.recipes.demo import run_demo

                run_demo(cfg)
        else:
            cfg = load_config(args.config, args.overrides)
            from posttrain.recipes import runners

            getattr(runners, f"run_{args.command}")(cfg)
    except (PosttrainError, FileNotFoundError) as err:
        print(f"posttrain {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"posttrain {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
