"""How a run uses its output directory from the CLI: refuse to clobber an unfinished run, resume it exactly,
stop cleanly on SIGINT, fall back from a damaged checkpoint, and reject a changed config on resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posttrain.config import build_config, dump_config

from tests.conftest import tiny_run_dict

pytestmark = pytest.mark.slow  # tens of seconds to minutes: `pytest -m "not slow"` skips it (make test runs all)

POSTTRAIN = str(Path(sys.executable).with_name("posttrain"))


def write_config(tmp_path, **changes):
    data = tiny_run_dict(tmp_path / "run")
    data["sft"].update(steps=12, log_every=1, eval_every=6)
    data["rl"].update(steps=4, eval_every=2)
    data["checkpoint"] = {"every": 1, "keep": 2}
    for key, value in changes.items():
        section, field = key.split(".")
        data[section][field] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def demo(config, *flags, **kw):
    return subprocess.run([POSTTRAIN, "demo", "--config", str(config), *flags], capture_output=True, text=True, **kw)


def checkpoints(run):
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_sigint_saves_and_exits_130_then_resume_finishes_and_clears_checkpoints(tmp_path):
    config = write_config(tmp_path, **{"sft.steps": 400})
    proc = subprocess.Popen([POSTTRAIN, "demo", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    while not checkpoints(run) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    saved = checkpoints(run)
    assert saved and "sft" in saved[-1]
    # without --resume the unfinished run is protected
    refused = demo(config)
    assert refused.returncode == 2 and "holds an unfinished run" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    done = demo(config, "--resume")
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    assert checkpoints(run) == [] and (run / "final" / "model.safetensors").is_file()


def test_resume_with_a_changed_config_is_refused(tmp_path):
    config = write_config(tmp_path, **{"checkpoint.every": 1})
    run = tmp_path / "run"
    run.mkdir(parents=True)
    saved = build_config(yaml.safe_load(config.read_text()), ["seed=5"])  # as the run wrote it, another seed
    dump_config(saved, run / "config.yaml")
    out = demo(config, "--resume")
    assert out.returncode == 2 and "config differs" in out.stderr and "seed (5 in the run, 0 now)" in out.stderr


def test_overwrite_starts_again(tmp_path):
    config = write_config(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints" / "000003-sft-000003").mkdir(parents=True)
    (run / "ppo").mkdir()  # the interrupted run's outputs (here: of another pipeline) and a file of the user's
    for name, text in (("config.yaml", "seed: 5\n"), ("bon.png", "old"), ("ppo/metrics.jsonl", "old"),
                       ("notes.txt", "mine")):
        (run / name).write_text(text)
    out = demo(config, "--overwrite")
    assert out.returncode == 0, out.stderr
    assert json.loads((run / "summary.json").read_text())["seed"] == 0
    assert not (run / "bon.png").exists() and not (run / "ppo").exists()  # nothing stale beside the new run
    assert (run / "notes.txt").read_text() == "mine"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    config = write_config(tmp_path, **{"sft.steps": 400})
    run = tmp_path / "run"
    proc = subprocess.Popen([POSTTRAIN, "demo", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while len(checkpoints(run)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    older, newest = checkpoints(run)[-2:]
    target = run / "checkpoints" / newest / "policy.safetensors"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    out = demo(config, "--resume", env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{newest} is invalid (policy.safetensors does not match its sha256 checksum" in out.stderr
    assert f"resuming from {run / 'checkpoints' / older}" in out.stderr


def _tiny_yaml(tmp_path, **sections):
    data = tiny_run_dict(tmp_path / "run")
    data["checkpoint"] = {"every": 1, "keep": 2}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sigint_after_first_checkpoint(args: list[str], run) -> tuple[int, str]:
    """Start `posttrain ARGS`, send SIGINT once its first checkpoint exists; (exit code, stderr)."""
    proc = subprocess.Popen([POSTTRAIN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not checkpoints(run) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("argv,sections,phase", [
    (["rm"], {"rm": {"steps": 3000, "num_pairs": 24, "batch_size": 8, "eval_every": 0, "calibration_size": 8}}, "rm"),
    (["dpo"], {"dpo": {"steps": 3000, "num_pairs": 24, "batch_size": 8, "eval_every": 0}}, "dpo"),
    (["rft"], {"rft": {"rounds": 1, "steps": 3000, "prompts_per_round": 12, "samples": 4, "max_new_tokens": 4,
                       "batch_size": 4, "min_score": None}}, "rft"),
    (["demo", "--pipeline", "rlhf", "--config"], {"sft": {"steps": 3000}, "rm": {"num_pairs": 24}}, "sft"),
], ids=["rm", "dpo", "rft", "rlhf-pipeline"])
def test_every_training_command_saves_on_sigint_and_refuses_to_clobber(tmp_path, argv, sections, phase):
    config = _tiny_yaml(tmp_path, **sections)
    run = tmp_path / "run"
    code, err = sigint_after_first_checkpoint([*argv, str(config)], run)
    assert code == 130, err
    assert f"stopped after {phase} step" in err and "continue with --resume" in err and "Traceback" not in err
    assert checkpoints(run) and phase in checkpoints(run)[-1]
    if phase == "sft":  # (the pipeline; each command shares open_run, so one check covers the refusal)
        refused = subprocess.run([POSTTRAIN, *argv, str(config)], capture_output=True, text=True)
        assert refused.returncode == 2 and "holds an unfinished run" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_rm_resumes_after_sigint_and_finishes(tmp_path):
    config = _tiny_yaml(tmp_path, rm={"steps": 150, "num_pairs": 24, "batch_size": 8, "eval_every": 0,
                                      "calibration_size": 8, "log_every": 1}, checkpoint={"every": 20})
    run = tmp_path / "run"
    code, err = sigint_after_first_checkpoint(["rm", str(config)], run)
    assert code == 130, err
    done = subprocess.run([POSTTRAIN, "rm", str(config), "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    assert checkpoints(run) == [] and (run / "final" / "model.safetensors").is_file()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # no step logged twice, none missing at the end
