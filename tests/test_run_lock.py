"""One command per run directory, and what a command does with the directory it is given (issue 16): the run
directory's lock (a second command, also with --overwrite, stops at once naming the holder; a lock left by a
killed process is taken over), an output_dir that cannot be a run directory, each command's default output
directory, overrides before and after the flags, --resume on a finished run, and the previous run's outputs
removed when a run starts from the beginning."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posttrain import api, cli
from posttrain.train.checkpoint import latest_checkpoint, verify_checkpoint
from posttrain.config import build_config
from posttrain.errors import ConfigError, PosttrainError
from posttrain.train.run import prepare_output_dir
from posttrain.train.control import RunDirBusy, lock_run_dir, open_run

from tests.conftest import tiny_run_dict

ROOT = Path(__file__).resolve().parent.parent
POSTTRAIN = str(Path(sys.executable).with_name("posttrain"))
HOLD = """\
import sys, time
from posttrain.train.control import lock_run_dir
with lock_run_dir(sys.argv[1], "posttrain sft held.yaml"):
    print("locked", flush=True)
    time.sleep(600)
"""


def hold_lock(run: Path) -> subprocess.Popen:
    """A child process that holds `run`'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_lock_held_by_another_process_is_refused_and_taken_over_once_it_dies(tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        with pytest.raises(RunDirBusy) as err, lock_run_dir(run, "posttrain rl x.yaml"):
            pass
        assert str(err.value) == (f"{run} is in use by another posttrain process (pid {holder.pid}: posttrain sft "
                                  "held.yaml); wait for it to finish or choose another output_dir")
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases its flock; the file still names it
        holder.wait()
    assert (run / ".lock").read_text().startswith(f"{holder.pid} ")
    with lock_run_dir(run, "posttrain rl x.yaml"):
        assert (run / ".lock").read_text().split()[0] == str(os.getpid())
    assert (run / ".lock").read_text() == ""  # released at the end


@pytest.mark.parametrize("argv", [
    ["demo"], ["demo", "--pipeline", "rlhf", "--overwrite"], ["sft", "CONFIG"], ["rm", "CONFIG", "--overwrite"],
    ["rl", "CONFIG", "--resume"], ["dpo", "CONFIG"], ["rft", "CONFIG"], ["bon", "--model", "m"],
], ids=["demo", "rlhf", "sft", "rm-overwrite", "rl-resume", "dpo", "rft", "bon"])
def test_every_command_takes_the_lock_before_touching_the_directory(argv, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "000001-sft-000001").mkdir(parents=True)  # the holder's state: must stay
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    called = []
    for module, name in api.RECIPES.values():
        monkeypatch.setattr(f"{module}.{name}", lambda *a, **k: called.append(a))
    monkeypatch.setattr("posttrain.recipes.demo.run_demo", lambda *a, **k: called.append(a))
    monkeypatch.setattr("posttrain.recipes.pipeline.run_rlhf", lambda *a, **k: called.append(a))
    config = tmp_path / "c.yaml"
    config.write_text("seed: 0\n")
    argv = [str(config) if a == "CONFIG" else a for a in argv]
    with lock_run_dir(run, "posttrain sft held.yaml"):  # held on another file description: as another process
        code = cli.main([*argv, f"output_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{run} is in use by another posttrain process (pid {os.getpid()}: posttrain sft held.yaml)" in err
    assert called == []
    assert (run / "checkpoints" / "000001-sft-000001").is_dir()
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.slow
def test_a_second_command_into_a_running_run_stops_at_once_and_the_first_stays_resumable(tmp_path):
    """Two real `posttrain` processes: while a demo runs, `demo --overwrite` and `sft` into its directory both
    stop with one line naming it and the demo's pid; the demo goes on, and its checkpoint and metrics stay valid."""
    data = tiny_run_dict(tmp_path / "run")
    data["sft"].update(steps=100000, log_every=1)
    data["checkpoint"] = {"every": 20, "keep": 2}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    first = subprocess.Popen([POSTTRAIN, "demo", "--config", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        while not any((run / "checkpoints").glob("0*")) and first.poll() is None:
            time.sleep(0.05)
        second = [subprocess.Popen([POSTTRAIN, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for argv in (["demo", "--config", str(config), "--overwrite"],
                               ["sft", str(config), f"output_dir={run}"])]
        for proc in second:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 2, err
            assert err.strip() == (f"posttrain {'demo' if 'demo' in proc.args else 'sft'}: error: {run} is in use by "
                                   f"another posttrain process (pid {first.pid}: posttrain demo --config {config}); "
                                   "wait for it to finish or choose another output_dir")
        assert first.poll() is None  # still training
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, err
    path, skipped = latest_checkpoint(run)
    assert path is not None and not skipped and verify_checkpoint(path) is None
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved or torn lines
    cfg = build_config(data)
    _, resumed = open_run(cfg, resume=True)  # what --resume reads
    assert resumed is not None and resumed.phase == "sft" and resumed.step >= 20


def test_a_read_only_file_system_is_one_line(tmp_path, monkeypatch, capsys):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code = cli.main(["demo", f"output_dir={tmp_path / 'ro' / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"posttrain demo: error: output_dir {tmp_path / 'ro' / 'run'}: cannot create the directory "
                   "(Read-only file system)")


# overrides before and after the flags, and each command's output directory -------------------------------

def capture_runs(monkeypatch) -> list:
    """Replace every recipe by one that records (command, config, flags)."""
    seen = []
    for name, (module, function) in api.RECIPES.items():
        monkeypatch.setattr(f"{module}.{function}", lambda cfg, name=name, **flags: seen.append((name, cfg, flags)))
    monkeypatch.setattr("posttrain.recipes.demo.run_demo", lambda cfg, **flags: seen.append(("demo", cfg, flags)))
    monkeypatch.setattr("posttrain.recipes.pipeline.run_rlhf",
                        lambda cfg, ablation, **flags: seen.append(("rlhf", cfg, flags)))
    return seen


@pytest.mark.parametrize("argv,resume", [
    (["demo", "rl.lr=1e-4", "--resume", "seed=3", "--seed", "3"], True),
    (["demo", "--pipeline", "rlhf", "seed=3", "--no-ablation", "rl.lr=1e-4"], False),
    (["sft", "CONFIG", "--resume", "seed=3", "rl.lr=1e-4"], True),
    (["rm", "CONFIG", "seed=3", "--overwrite", "rl.lr=1e-4"], False),
    (["rl", "CONFIG", "seed=3", "--resume", "rl.lr=1e-4"], True),
    (["dpo", "CONFIG", "--resume", "seed=3", "rl.lr=1e-4"], True),
    (["rft", "CONFIG", "--overwrite", "seed=3", "rl.lr=1e-4"], False),
    (["bon", "seed=3", "--n", "4", "rl.lr=1e-4", "--model", "m"], None),
], ids=["demo", "rlhf", "sft", "rm", "rl", "dpo", "rft", "bon"])
def test_overrides_are_accepted_before_and_after_the_flags(argv, resume, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = capture_runs(monkeypatch)
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    argv = ["c.yaml" if a == "CONFIG" else a for a in argv]
    assert cli.main(argv) == 0, capsys.readouterr().err
    ((_, cfg, flags),) = seen
    assert (cfg.seed, cfg.rl.lr) == (3, 1e-4)
    if resume is not None:
        assert flags["resume"] is resume and flags["overwrite"] is (not resume and "--overwrite" in argv)


def test_an_unknown_flag_after_the_overrides_is_still_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["rl", "c.yaml", "rl.lr=1e-4", "--bogus"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def output_dir_of(argv: list[str]) -> str:
    cfg, _ = cli._command(cli.parse_args(argv))
    return cfg.output_dir


@pytest.mark.parametrize("argv,expected", [
    (["sft", "configs/sft_arithmetic.yaml"], "runs/sft_arithmetic"),
    (["rm", "configs/sft_arithmetic.yaml"], "runs/rm_sft_arithmetic"),
    (["rl", "configs/grpo_arithmetic.yaml"], "runs/rl_grpo_arithmetic"),
    (["rl", "configs/rl_arithmetic.yaml"], "runs/rl_arithmetic"),
    (["dpo", "configs/dpo_arithmetic.yaml"], "runs/dpo_arithmetic"),
    (["rft", "configs/sft_arithmetic.yaml"], "runs/rft_sft_arithmetic"),
    (["bon"], "runs/bon"),
    (["bon", "--config", "configs/sft_arithmetic.yaml"], "runs/bon_sft_arithmetic"),
    (["demo"], "runs/demo"),
    (["demo", "--config", "configs/demo.yaml"], "runs/demo"),
    (["demo", "--pipeline", "rlhf"], "runs/rlhf"),
    (["demo", "--pipeline", "rlhf", "--config", "configs/rlhf_demo.yaml"], "runs/rlhf"),
    (["rm", "configs/sft_arithmetic.yaml", "output_dir=mine"], "mine"),  # what you write always wins
    (["bon", "--output-dir", "mine"], "mine"),
    (["demo", "--output-dir", "mine"], "mine"),
])
def test_each_command_has_its_own_default_output_dir(argv, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert output_dir_of(argv) == expected


def test_an_output_dir_key_in_your_yaml_wins(tmp_path):
    (tmp_path / "mine.yaml").write_text("output_dir: somewhere\n")
    assert output_dir_of(["rm", str(tmp_path / "mine.yaml")]) == "somewhere"


def test_no_shipped_config_makes_two_commands_share_a_directory(monkeypatch):
    """Every (command, shipped config) pair has its own directory, and the chains the configs name still hold:
    every model.path under runs/ is a directory some command with some shipped config writes."""
    monkeypatch.chdir(ROOT)
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    owner: dict[str, str] = {}  # output directory -> the command that writes it
    for config in configs:
        rel = str(config.relative_to(ROOT))
        commands = [[c, rel] for c in ("sft", "rm", "rl", "dpo", "rft")]
        commands += [["bon", "--config", rel], ["demo", "--config", rel], ["demo", "--pipeline", "rlhf", "--config", rel]]
        for argv in commands:
            try:
                out = output_dir_of(argv)
            except ConfigError:  # a command that refuses the config writes nothing
                continue
            command = argv[0] + (" --pipeline rlhf" if "rlhf" in argv else "")
            assert owner.setdefault(out, command) == command, f"posttrain {' '.join(argv)} writes {out}, as " \
                                                              f"posttrain {owner[out]} does"
    for config in configs:
        path = (yaml.safe_load(config.read_text()).get("model") or {}).get("path")
        if path and path.startswith("runs/"):
            assert str(Path(path).parent) in owner, f"{config.name}: nothing writes {path}"


# --resume on a finished run; the previous run's outputs ---------------------------------------------------

def test_resume_of_a_finished_run_says_so(tmp_path):
    cfg = build_config(tiny_run_dict(tmp_path / "run"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    with pytest.raises(PosttrainError, match=r"holds a finished run \(summary.json, no checkpoint left\); nothing "
                       r"to resume \(pass --overwrite to run it again\)"):
        open_run(cfg, resume=True)
    with pytest.raises(PosttrainError, match="--resume and --overwrite exclude each other"):
        open_run(cfg, resume=True, overwrite=True)
    assert open_run(cfg, resume=False) == (run, None)  # a fresh start replaces it


def old_run(run: Path) -> None:
    """A directory as a finished (or interrupted) earlier run left it, plus a file of the user's."""
    for name in ("final", "sft", "rm", "ppo", "ablation"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_text("old")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.png", "rlhf.png", "bon.png", "best.jsonl"):
        (run / name).write_text("old")
    (run / "notes.txt").write_text("mine")


def test_a_run_from_the_beginning_removes_the_previous_runs_outputs(tmp_path):
    run = tmp_path / "run"
    old_run(run)
    (run / "checkpoints" / "000004-rl-000002").mkdir(parents=True)  # interrupted: --overwrite starts again
    cfg = build_config(tiny_run_dict(run))
    with pytest.raises(PosttrainError, match="holds an unfinished run"):
        open_run(cfg)
    assert (run / "final").is_dir()  # refused: nothing touched
    open_run(cfg, overwrite=True)
    prepare_output_dir(cfg)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notes.txt"]
    assert build_config(yaml.safe_load((run / "config.yaml").read_text())) == cfg


def test_a_resumed_run_keeps_its_outputs_and_a_run_keeps_what_it_reads(tmp_path):
    run = tmp_path / "run"
    old_run(run)
    (run / "checkpoints" / "000004-sft-000002").mkdir(parents=True)
    cfg = build_config(tiny_run_dict(run))
    prepare_output_dir(cfg)  # as a resume calls it: the checkpoint's run goes on
    assert (run / "sft" / "model.safetensors").is_file() and (run / "summary.json").is_file()
    (run / "checkpoints" / "000004-sft-000002").rmdir()
    cfg = build_config(tiny_run_dict(run), [f"model.path={run / 'final'}"])  # continues from its own result
    prepare_output_dir(cfg)
    assert (run / "final" / "model.safetensors").is_file() and not (run / "summary.json").exists()


def test_a_directory_that_is_not_a_run_is_left_alone(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "summary.json").write_text("theirs")  # no config.yaml: not a posttrain run directory
    prepare_output_dir(build_config(tiny_run_dict(tmp_path)))
    assert (tmp_path / "final").is_dir() and (tmp_path / "summary.json").read_text() == "theirs"


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"posttrain {version('posttrain')}"
