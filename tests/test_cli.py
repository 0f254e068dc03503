"""The command line, run as a user runs it: user errors are one line on stderr and exit code 2; tiny
end-to-end `sft`, `rl` and `demo` runs write the documented run directory."""

import json
import subprocess
import sys

import pytest

from posttrain.cli import main
from posttrain.config import load_config

CLI = [sys.executable, "-m", "posttrain.cli"]

TINY_YAML = """\
# output_dir is given on each command line
seed: 0
threads: 1
progress: false
model: {hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 64}
task: {max_operand: 20, num_eval: 20}
sft: {steps: 5, batch_size: 16, warmup_steps: 1, eval_every: 0, log_every: 1}
rl: {steps: 2, prompts_per_step: 4, group_size: 4, mini_batches: 1, max_new_tokens: 4, warmup_steps: 1,
     eval_every: 0}
eval: {batch_size: 20, max_new_tokens: 4}
"""

TINY_OVERRIDES = [
    "threads=1", "progress=false", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "model.intermediate_size=64", "task.num_eval=20", "task.max_operand=20",
    "sft.steps=5", "sft.batch_size=16", "sft.eval_every=0", "rl.steps=2", "rl.prompts_per_step=4",
    "rl.group_size=4", "rl.mini_batches=1", "rl.max_new_tokens=4", "rl.eval_every=0", "eval.batch_size=20",
    "eval.max_new_tokens=4",
]

ERROR_CASES = {
    "not-an-int": (["demo", "--seed", "abc"], ["--seed", "abc"]),
    "unknown-key": (["demo", "rl.stepz=1"], ["rl.stepz", "rl.steps"]),
    "missing-file": (["sft", "missing.yaml"], ["missing.yaml"]),
    "out-of-range": (["demo", "sft.steps=-1"], ["sft.steps"]),
}


def launch(args, cwd):
    return subprocess.Popen([*CLI, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc, timeout=240):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every CLI process of this module, started together: most of their time is importing torch and
    transformers, so they overlap. `rl` starts from the `sft` run's final/ model once that exists."""
    errors_cwd = tmp_path_factory.mktemp("cli_errors")
    root = tmp_path_factory.mktemp("cli_e2e")
    config = root / "tiny.yaml"
    config.write_text(TINY_YAML)
    procs = {name: launch(args, errors_cwd) for name, (args, _) in ERROR_CASES.items()}
    try:
        procs["sft"] = launch(["sft", config, f"output_dir={root / 'sft'}"], root)
        procs["demo"] = launch(["demo", "--output-dir", root / "demo", "--seed", "1", *TINY_OVERRIDES], root)
        results = {"sft": finish(procs["sft"])}
        procs["rl"] = launch(["rl", config, f"model.path={root / 'sft' / 'final'}", f"output_dir={root / 'rl'}"],
                             root)
        results.update({name: finish(proc) for name, proc in procs.items() if name != "sft"})
    finally:
        for proc in procs.values():  # only after a failure above: no process outlives the fixture
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return errors_cwd, root, results


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_are_one_line_and_exit_2(cli, case):
    code, stdout, stderr = cli[2][case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr + stdout
    for word in ERROR_CASES[case][1]:
        assert word in lines[0]


@pytest.mark.slow
def test_user_errors_write_nothing(cli):
    assert list(cli[0].iterdir()) == []


def check_run_dir(run_dir, phases: set[str], summary_keys: set[str]) -> dict:
    assert (run_dir / "config.yaml").is_file()
    load_config(run_dir / "config.yaml")  # the resolved config loads back
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records
    assert all(isinstance(r["step"], int) and r["phase"] in phases for r in records)
    assert {r["phase"] for r in records} == phases
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"summary.json holds {c}, not strict JSON"))
    assert summary_keys <= summary.keys()
    return summary


@pytest.mark.slow
def test_sft_then_rl_from_the_sft_model(cli):
    _, root, results = cli
    for name in ("sft", "rl"):
        code, stdout, stderr = results[name]
        assert code == 0, stderr
        assert "Traceback" not in stderr

    sft = check_run_dir(root / "sft", {"sft"}, {"sft_accuracy", "eval_problems", "seed", "wall_seconds"})
    assert sft["eval_problems"] == 20 and sft["seed"] == 0
    assert 0.0 <= sft["sft_accuracy"] <= 1.0
    sft_steps = [r["step"] for r in map(json.loads, (root / "sft" / "metrics.jsonl").read_text().splitlines())]
    assert sft_steps == [1, 2, 3, 4, 5]

    rl = check_run_dir(root / "rl", {"rl"}, {"initial_accuracy", "rl_accuracy", "eval_problems", "seed",
                                            "wall_seconds"})
    assert rl["eval_problems"] == 20
    # the RL run starts from the SFT run's final model: the same greedy answers on the same problems
    assert rl["initial_accuracy"] == sft["sft_accuracy"]
    assert load_config(root / "rl" / "config.yaml").model.path == str(root / "sft" / "final")
    rl_steps = [r["step"] for r in map(json.loads, (root / "rl" / "metrics.jsonl").read_text().splitlines())]
    assert rl_steps == [0, 1, 2]


@pytest.mark.slow
def test_demo_writes_sft_and_final_models_and_a_summary(cli):
    _, root, results = cli
    code, stdout, stderr = results["demo"]
    assert code == 0, stderr
    assert "Traceback" not in stderr
    run = root / "demo"
    summary = check_run_dir(run, {"sft", "rl"}, {"sft_accuracy", "rl_accuracy", "eval_problems", "seed",
                                                 "wall_seconds"})
    assert (run / "sft" / "model.safetensors").is_file()
    assert summary["eval_problems"] == 20 and summary["seed"] == 1
    assert 0.0 <= summary["sft_accuracy"] <= 1.0 and 0.0 <= summary["rl_accuracy"] <= 1.0
    assert "held-out accuracy" in stdout


# In-process checks of main(): no interpreter start-up, so they cost milliseconds.

def capture_demo(monkeypatch):
    seen = []
    monkeypatch.setattr("posttrain.recipes.demo.run_demo", lambda cfg, **flags: seen.append(cfg))
    return seen


def test_demo_flags_and_overrides_reach_the_config(monkeypatch, tmp_path):
    seen = capture_demo(monkeypatch)
    assert main(["demo", "--seed", "4", "--output-dir", str(tmp_path / "x"), "rl.lr=1e-4"]) == 0
    (cfg,) = seen
    assert (cfg.seed, cfg.output_dir, cfg.rl.lr) == (4, str(tmp_path / "x"), 1e-4)


def test_numeric_output_dir_flag_is_a_path(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    seen = capture_demo(monkeypatch)
    assert main(["demo", "--output-dir", "2024"]) == 0, capsys.readouterr().err
    assert seen[0].output_dir == "2024"


def test_a_task_with_too_few_problems_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["demo", "task.max_operand=5", "threads=1", "progress=false", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "task" in err
