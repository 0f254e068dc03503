"""Bad input, one case per row: the CLI prints one line naming the file, line or field, exits with code 2, and
leaves no output directory behind. docs/errors.md lists the same cases with their messages
(`python -m tests.test_errors` prints that table)."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.train.control import lock_run_dir

TINY = ["threads=1", "progress=false", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.intermediate_size=64", "task.num_eval=20", "task.max_operand=20",
        "sft.steps=2", "rl.steps=1", "rl.prompts_per_step=4", "rl.group_size=4", "rm.steps=1"]


def files(d: Path) -> dict[str, Path]:
    """Bad files and directories, made once per test in `d`."""
    (d / "bad.yaml").write_text("rl:\n  lr: [1, 2\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "ok.yaml").write_text("rl:\n  steps: 1\n")
    (d / "malformed.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", \n')
    (d / "missing_field.jsonl").write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    (d / "wrong_type.jsonl").write_text('{"prompt": "1+1=", "chosen": 2, "rejected": "3"}\n')
    (d / "empty_prompt.jsonl").write_text('{"prompt": "", "chosen": "2", "rejected": "3"}\n')
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "chosen": "2", "rejected": "3"}\n')
    (d / "not_object.jsonl").write_text('["1+1=", "2", "3"]\n')
    (d / "empty.jsonl").write_text("")
    with gzip.open(d / "truncated.jsonl.gz", "wb") as f:
        f.write(b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n' * 50)
    (d / "truncated.jsonl.gz").write_bytes((d / "truncated.jsonl.gz").read_bytes()[:30])
    (d / "ptx_bad.jsonl").write_text('{"txt": "hello"}\n')
    (d / "no_config_model").mkdir(exist_ok=True)
    (d / "gsm8k_bad.jsonl").write_text('{"question": "How many?"}\n')
    no_special_tokens_model(d / "no_pad_no_eos")
    (d / "bad_key.yaml").write_text("rl:\n  lrr: 1.0e-4\n")
    (d / "a_run" / "final").mkdir(parents=True, exist_ok=True)  # a run directory: its model is in final/
    (d / "a_run" / "final" / "config.json").write_text("{}\n")
    (d / "a_file").write_text("")
    (d / "a_reward_model").mkdir(exist_ok=True)  # what posttrain rm writes: a scalar-head model, no LM head
    (d / "a_reward_model" / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}\n')
    (d / "a_policy").mkdir(exist_ok=True)
    (d / "a_policy" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (d / "finished").mkdir(exist_ok=True)  # a run that completed: config.yaml, summary.json, no checkpoints
    (d / "finished" / "config.yaml").write_text("seed: 0\n")
    (d / "finished" / "summary.json").write_text("{}\n")
    (d / "custom.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n' * 4)
    (d / "custom_no_prompt.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n')
    (d / "case_rewards.py").write_text("def needs_gold(prompts, completions, gold):\n    return [0.0] * len(completions)\n")
    (d / "busy").mkdir(exist_ok=True)  # a run directory another command holds (here: this process, another fd)
    hold = lock_run_dir(d / "busy", "posttrain sft ok.yaml output_dir=busy")
    hold.__enter__()
    HELD.append(hold)
    return {p.name: p for p in d.iterdir()}


HELD: list = []  # the run-directory locks `files` holds; released after each test


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    while HELD:
        HELD.pop().__exit__(None, None, None)


def no_special_tokens_model(path: Path, keep_eos: bool = False) -> Path:
    """A tiny Hugging Face model directory whose tokenizer has no pad token (and no EOS unless `keep_eos`)."""
    from posttrain.config import ModelConfig
    from posttrain.models import build_char_tokenizer, build_tiny_model, save_pretrained
    from tests.conftest import TINY_MODEL

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(ModelConfig(**TINY_MODEL), tokenizer, seed=0)
    tokenizer.pad_token = None
    if not keep_eos:
        tokenizer.eos_token = None
    return save_pretrained(model, tokenizer, path)


# (id, argv built from the files dict `f` and the run dir `out`, text the one-line message must contain)
CASES = [
    ("unknown-key", lambda f, out: ["rl", str(f["ok.yaml"]), "rl.lrr=1e-4"], "command line: unknown config key 'rl.lrr' (did you mean 'rl.lr'?)"),
    ("unknown-key-in-yaml", lambda f, out: ["rl", str(f["bad_key.yaml"]), "rl.lr=1e-4"], "bad_key.yaml: unknown config key 'rl.lrr' (did you mean 'rl.lr'?)"),
    ("unknown-section", lambda f, out: ["demo", "rll.steps=1"], "unknown config key 'rll'"),
    ("wrong-type", lambda f, out: ["demo", "rl.lr=fast"], "rl.lr: Input should be a valid number"),
    ("out-of-range", lambda f, out: ["demo", "rl.clip_eps_low=1.5"], "rl.clip_eps_low: Input should be less than 1"),
    ("negative-steps", lambda f, out: ["demo", "sft.steps=-1"], "sft.steps: Input should be greater than or equal to 0"),
    ("batch-not-divisible", lambda f, out: ["demo", "rl.mini_batches=3"], "must be divisible by rl.mini_batches (3)"),
    ("micro-batch", lambda f, out: ["demo", "rl.micro_batch_size=3"], "rl.micro_batch_size (3) must divide the minibatch size"),
    ("zero-accumulation", lambda f, out: ["demo", "rl.micro_batch_size=0"], "rl.micro_batch_size: Input should be greater than or equal to 1"),
    ("dynamic-sampling-group", lambda f, out: ["demo", "rl.dynamic_sampling=true", "rl.group_size=1"], "rl.dynamic_sampling needs rl.group_size >= 2"),
    ("unknown-preset", lambda f, out: ["demo", "rl.preset=grpoo"], "rl.preset must be one of"),
    ("unknown-estimator", lambda f, out: ["demo", "rl.advantage=rlo"], "did you mean 'rloo'"),
    ("unknown-enum", lambda f, out: ["demo", "rl.kl_placement=everywhere"], "rl.kl_placement: Input should be 'loss' or 'reward'"),
    ("incompatible-reward", lambda f, out: ["demo", "rl.reward=reward_model"], "rl.reward_model_path is required"),
    ("operand-range", lambda f, out: ["demo", "task.min_operand=50", "task.max_operand=10"], "task.max_operand (10) must be >= task.min_operand (50)"),
    ("heads", lambda f, out: ["demo", "model.hidden_size=30"], "model.hidden_size (30) must be divisible by model.num_heads (4)"),
    ("bad-override", lambda f, out: ["demo", "rl.lr"], "override 'rl.lr' is not of the form key=value"),
    ("config-missing", lambda f, out: ["rl", "nowhere.yaml"], "config file not found: nowhere.yaml"),
    ("config-bad-yaml", lambda f, out: ["rl", str(f["bad.yaml"])], "bad.yaml line 3: not valid YAML"),
    ("config-not-mapping", lambda f, out: ["rl", str(f["list.yaml"])], "the top level must be a mapping"),
    ("bad-flag", lambda f, out: ["demo", "--sed", "1"], "unrecognized arguments: --sed"),
    ("no-config", lambda f, out: ["sft"], "the following arguments are required: config (see"),
    ("resume-and-overwrite", lambda f, out: ["rl", str(f["ok.yaml"]), "--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    ("resume-finished-run", lambda f, out: ["demo", "--resume", f"output_dir={f['finished']}"], "finished holds a finished run (summary.json, no checkpoint left); nothing to resume"),
    ("output-dir-is-a-file", lambda f, out: ["sft", str(f["ok.yaml"]), f"output_dir={f['a_file']}"], "a_file is a file, not a directory"),
    ("output-dir-under-a-file", lambda f, out: ["sft", str(f["ok.yaml"]), f"output_dir={f['a_file']}/run"], "a_file is a file, not a directory"),
    ("output-dir-not-writable", lambda f, out: ["sft", str(f["ok.yaml"]), "output_dir=/sys/posttrain_run"], "output_dir /sys/posttrain_run: cannot create the directory"),
    ("output-dir-in-use", lambda f, out: ["sft", str(f["ok.yaml"]), "--overwrite", f"output_dir={f['busy']}"], "busy is in use by another posttrain process (pid "),
    ("model-dir-missing", lambda f, out: ["rl", str(f["ok.yaml"]), "model.path=nowhere"], "model.path: directory not found: nowhere"),
    ("model-dir-is-a-run", lambda f, out: ["rl", str(f["ok.yaml"]), f"model.path={f['a_run']}"], "a_run has no config.json; did you mean "),
    ("model-dir-not-hf", lambda f, out: ["rl", str(f["ok.yaml"]), f"model.path={f['no_config_model']}"], "has no config.json"),
    ("rm-path-missing", lambda f, out: ["rl", str(f["ok.yaml"]), "rl.reward=reward_model", "rl.reward_model_path=nowhere"], "nowhere"),
    ("pairs-missing", lambda f, out: ["rm", str(f["ok.yaml"]), "rm.data=nowhere.jsonl"], "nowhere.jsonl"),
    ("pairs-malformed-json", lambda f, out: ["rm", str(f["ok.yaml"]), f"rm.data={f['malformed.jsonl']}"], "malformed.jsonl line 2: not valid JSON"),
    ("pairs-missing-field", lambda f, out: ["rm", str(f["ok.yaml"]), f"rm.data={f['missing_field.jsonl']}"], "missing_field.jsonl line 1: missing field 'rejected'"),
    ("pairs-wrong-type", lambda f, out: ["rm", str(f["ok.yaml"]), f"rm.data={f['wrong_type.jsonl']}"], "wrong_type.jsonl line 1: field 'chosen' must be a string, got int"),
    ("pairs-empty-prompt", lambda f, out: ["rm", str(f["ok.yaml"]), f"rm.data={f['empty_prompt.jsonl']}", "rm.format=prompt_chosen_rejected"], "empty_prompt.jsonl line 1"),
    ("pairs-invalid-utf8", lambda f, out: ["rm", str(f["ok.yaml"]), f"rm.data={f['latin1.jsonl']}"], "latin1.jsonl"),
    ("pairs-not-object", lambda f, out: ["rm", str(f["ok.yaml"]), f"rm.data={f['not_object.jsonl']}"], "not_object.jsonl line 1: expected a JSON object"),
    ("pairs-empty-file", lambda f, out: ["rm", str(f["ok.yaml"]), f"rm.data={f['empty.jsonl']}"], "empty.jsonl"),
    ("pairs-truncated-gzip", lambda f, out: ["rm", str(f["ok.yaml"]), f"rm.data={f['truncated.jsonl.gz']}"], "truncated.jsonl.gz"),
    ("ptx-missing", lambda f, out: ["rl", str(f["ok.yaml"]), "rl.ptx_coef=0.1", "rl.ptx_data=nowhere.jsonl"], "nowhere.jsonl"),
    ("ptx-bad-row", lambda f, out: ["rl", str(f["ok.yaml"]), "rl.ptx_coef=0.1", f"rl.ptx_data={f['ptx_bad.jsonl']}"], "ptx_bad.jsonl line 1: needs a string 'text'"),
    ("task-data-missing", lambda f, out: ["rl", str(f["ok.yaml"]), "task.name=gsm8k", "task.path=nowhere.jsonl"], "nowhere.jsonl"),
    ("task-data-bad-row", lambda f, out: ["rl", str(f["ok.yaml"]), "task.name=gsm8k", f"task.path={f['gsm8k_bad.jsonl']}"], "gsm8k_bad.jsonl:1: missing field 'answer'"),
    ("arithmetic-only-key", lambda f, out: ["rl", str(f["ok.yaml"]), "task.name=gsm8k", "task.max_operand=5"], "task.max_operand applies only to task.name arithmetic"),
    ("dpo-pairs-missing-field", lambda f, out: ["dpo", str(f["ok.yaml"]), f"dpo.data={f['missing_field.jsonl']}"], "missing_field.jsonl line 1: missing field 'rejected'"),
    ("rft-too-many-prompts", lambda f, out: ["rft", str(f["ok.yaml"]), "rft.prompts_per_round=100000"], "rft.prompts_per_round (100000) exceeds the"),
    ("ray-unequal-shares", lambda f, out: ["rl", str(f["ok.yaml"]), "backend=ray", "ray.num_rollout_workers=3"], "must be divisible by ray.num_rollout_workers (3)"),
    ("ray-not-rl", lambda f, out: ["sft", str(f["ok.yaml"]), "backend=ray"], "backend ray runs only posttrain rl"),
    ("ray-address-unreachable", lambda f, out: ["rl", str(f["ok.yaml"]), "backend=ray", "ray.address=127.0.0.1:1"], "ray.address=127.0.0.1:1: nothing answers at 127.0.0.1:1"),
    ("ray-address-malformed", lambda f, out: ["rl", str(f["ok.yaml"]), "backend=ray", "ray.address=headnode"], "ray.address=headnode: expected 'auto', 'HOST:PORT' or 'ray://HOST:PORT'"),
    ("tokenizer-no-pad-no-eos", lambda f, out: ["sft", str(f["ok.yaml"]), f"model.path={f['no_pad_no_eos']}"], "has neither a pad nor an eos token"),
    ("policy-is-a-reward-model", lambda f, out: ["rl", str(f["ok.yaml"]), f"model.path={f['a_reward_model']}"], "holds a LlamaForSequenceClassification (a reward model or critic), not a causal LM"),
    ("rm-path-is-a-policy", lambda f, out: ["rl", str(f["ok.yaml"]), "rl.reward=reward_model", f"rl.reward_model_path={f['a_policy']}"], "holds a LlamaForCausalLM, not a reward model"),
    ("ray-bf16", lambda f, out: ["rl", str(f["ok.yaml"]), "backend=ray", "model.dtype=bfloat16"], "model.dtype=bfloat16 is not available with backend=ray"),
    ("ifeval-without-a-model", lambda f, out: ["rl", str(f["ok.yaml"]), "task.name=ifeval", "task.num_eval=8"], "task ifeval needs a tokenizer that covers its text"),
    ("reward-module-missing", lambda f, out: ["rl", str(f["ok.yaml"]), *custom(f), "rl.reward_funcs=[nomodule:fn]"], "rl.reward_funcs[0]: no module named 'nomodule'"),
    ("reward-function-missing", lambda f, out: ["rl", str(f["ok.yaml"]), *custom(f), "rl.reward_funcs=[case_rewards:nofn]"], "rl.reward_funcs[0]: module case_rewards has no 'nofn'"),
    ("reward-column-missing", lambda f, out: ["rl", str(f["ok.yaml"]), *custom(f), "rl.reward_funcs=[case_rewards:needs_gold]"], "custom.jsonl does not have (it has answer)"),
    ("reward-weights-mismatch", lambda f, out: ["rl", str(f["ok.yaml"]), *custom(f), "rl.reward_funcs=[posttrain.rewards:math_reward]", "rl.reward_weights=[1, 2]"], "rl.reward_weights has 2 values for 1 rl.reward_funcs"),
    ("custom-task-without-reward", lambda f, out: ["rl", str(f["ok.yaml"]), *custom(f)], "task custom has no reward of its own: set rl.reward_funcs"),
    ("custom-task-row-without-prompt", lambda f, out: ["rl", str(f["ok.yaml"]), "task.name=custom", f"task.path={f['custom_no_prompt.jsonl']}", "rl.reward_funcs=[posttrain.rewards:math_reward]"], "custom_no_prompt.jsonl:1: missing field 'prompt' (task.prompt_field), and no 'messages' column"),
    ("eval-model-missing", lambda f, out: ["eval", "nowhere"], "model.path: directory not found: nowhere"),
    ("prompt-too-long", lambda f, out: ["sft", str(f["ok.yaml"]), "model.max_position_embeddings=8"], "context"),
]


def custom(f: dict) -> list[str]:
    """A custom task on custom.jsonl (8 rows: prompt, answer)."""
    return ["task.name=custom", f"task.path={f['custom.jsonl']}", "task.num_eval=2"]


def run_case(argv_fn, tmp_path, capsys):
    f = files(tmp_path)
    out = tmp_path / "run"
    argv = argv_fn(f, out)
    argv = with_tiny(argv, out)
    code = exit_code(argv)
    err = capsys.readouterr().err.strip()
    return code, err, out


def with_tiny(argv: list[str], out: Path) -> list[str]:
    """Insert the tiny-model settings before the case's own overrides (which must win), and the run dir."""
    if argv[0] not in ("sft", "rl", "rm", "dpo", "rft", "demo") or (argv[0] != "demo" and len(argv) < 2):
        return argv
    at = 1 if argv[0] == "demo" else 2
    tiny = [t for t in TINY if not t.startswith("task.")] if any("task.name" in a for a in argv) else TINY
    return [*argv[:at], *tiny, f"output_dir={out}", *argv[at:]]


def exit_code(argv) -> int:
    """main's return value, or the code argparse exits with (a bad flag)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("case_id,argv_fn,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_output(case_id, argv_fn, expected, tmp_path, capsys, monkeypatch,
                                                     caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level("WARNING")
    code, err, out = run_case(argv_fn, tmp_path, capsys)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # logged lines would reach stderr too
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert not out.exists(), f"{case_id} left {sorted(p.name for p in out.iterdir())}"


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


if __name__ == "__main__":  # print docs/errors.md's table
    import tempfile

    class _Cap:
        def readouterr(self):
            return self

    print("| case | command (tiny settings omitted) | message |\n|---|---|---|")
    for case_id, argv_fn, _ in CASES:
        with tempfile.TemporaryDirectory() as d:
            import contextlib
            import io
            import os

            os.chdir(d)
            buf = io.StringIO()
            with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):  # notes aside
                try:
                    argv = argv_fn(files(Path(d)), Path(d) / "run")
                    shown = " ".join(a.replace(d + "/", "") for a in argv)
                    full = with_tiny(argv, Path(d) / "run")
                    main(full)
                except SystemExit:
                    pass
                finally:
                    while HELD:
                        HELD.pop().__exit__(None, None, None)
            msg = buf.getvalue().strip().replace(d + "/", "").replace(f"pid {os.getpid()}", "pid 4242")
            msg = msg.replace("|", "\\|")
            print(f"| {case_id} | `posttrain {shown}` | `{msg}` |")
        sys.stdout.flush()
