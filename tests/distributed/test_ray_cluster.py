"""backend ray on a local Ray instance with 2 CPUs (the CI test of issue 9).

One Ray session serves the module (its start costs seconds; every actor imports torch):

1. GRPO for 5 steps with 2 rollout workers, 1 reward worker and a 2-rank gloo learner; rollout worker 1 is
   killed (SIGKILL) while step 3's shares are out. The run completes, and its metrics and final weights equal a
   single-process run of the same seed and shares exactly (the share seeds make a re-issued share identical).
2. The 2-rank learner's all-reduced gradient equals single-process actor_backward on the same batch (1e-6).
3. A hung worker is reported by the timeout, in one line naming it.
4. `posttrain rl CONFIG backend=ray` end to end; a learner rank killed mid-run: every role restarts and the run
   resumes from its checkpoint, ending exactly as the single-process run.
5. Nothing is left behind: no Ray process, no temporary directory, no ~/.ray/auth_token.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from posttrain.cli import main  # noqa: E402
from posttrain.config import dump_config  # noqa: E402
from posttrain.distributed.cluster import ray_session, start_ray_cluster  # noqa: E402
from posttrain.errors import WorkerTimeout  # noqa: E402
from posttrain.models import load_policy  # noqa: E402
from posttrain.train.optim import PhaseTimer  # noqa: E402
from posttrain.rl.learner import actor_backward  # noqa: E402
from posttrain.rl.loop import RLRun, make_experience, train_rl  # noqa: E402
from posttrain.rl.roles import InlineRoles  # noqa: E402
from posttrain.rollout.engines import shard_seed  # noqa: E402
from posttrain.tasks import ArithmeticTask  # noqa: E402

pytestmark = pytest.mark.slow  # tens of seconds to minutes: `pytest -m "not slow"` skips it (make test runs all)

VOLATILE = ("time/", "tokens_per_s", "ray/restarts")  # wall clock, and the restart count (1 in the Ray run)
KILL_AT_STEP = 3


class Rows:
    def __init__(self):
        self.rows = []

    def log(self, record):
        self.rows.append(record)


def start(cfg):
    model, tokenizer = load_policy(cfg.model, seed=cfg.seed)
    return model, tokenizer, ArithmeticTask(cfg.task, cfg.seed)


def kill_when_step_generates(roles, cfg, pid_of, killed: dict) -> None:
    """SIGKILL the process `pid_of()` as soon as step KILL_AT_STEP's last share is out to the rollout workers
    (recognised by its sampling seed), once; `killed` records the pid and the time."""
    last = len(roles.rollout_workers) - 1
    seed = shard_seed(cfg.seed, KILL_AT_STEP, 0, last)
    submit = roles.rollout_workers.submit

    def submit_and_kill(worker, method, *args):
        call = submit(worker, method, *args)
        if method == "generate" and args[1] == seed and not killed:
            killed.update(pid=pid_of(), at=time.monotonic())
            os.kill(killed["pid"], signal.SIGKILL)
        return call

    roles.rollout_workers.submit = submit_and_kill


def steady(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process (Linux /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return out


def ray_processes(temp: Path) -> set[int]:
    """Processes of the Ray instance whose files are in `temp` (they name it), and all their descendants."""
    procs = _processes()
    found = {pid for pid, (_, cmd) in procs.items() if str(temp) in cmd}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


class Env:
    """The module's Ray session (in a short output directory, so Ray's files go inside it)."""

    def __init__(self, cfg_factory, model_dir):
        self.out = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
        self.cfg = cfg_factory(self.out, model_dir)
        self.model_dir = model_dir
        self.token_before = (Path.home() / ".ray" / "auth_token").exists()
        self.env_before = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
        self.stack = ExitStack()
        start = time.perf_counter()
        self.temp = self.stack.enter_context(ray_session(self.cfg, self.out))
        self.start_seconds = time.perf_counter() - start
        self.pids = ray_processes(self.temp)
        self.closed = False

    def close(self):
        if not self.closed:
            self.closed = True
            self.stack.close()
            shutil.rmtree(self.out, ignore_errors=True)


@pytest.fixture(scope="module")
def env(ray_config, sft_model_dir):
    e = Env(ray_config, sft_model_dir)
    yield e
    e.close()


@pytest.fixture(scope="module")
def ray_run(env):
    """GRPO, 5 steps: 2 rollout workers (one killed at step 3), 1 reward worker, 2 gloo learner ranks."""
    cfg = env.cfg
    model, tokenizer, task = start(cfg)
    t0 = time.perf_counter()
    cluster = start_ray_cluster(cfg, model, tokenizer, task)
    started = time.perf_counter() - t0
    killed = {}
    kill_when_step_generates(cluster, cfg, lambda: cluster.rollout_workers.pids[1], killed)
    logger = Rows()
    t0 = time.perf_counter()
    accuracy = train_rl(cfg, cluster, task, logger)
    run = {"rows": logger.rows, "accuracy": accuracy, "weights": {k: v.clone() for k, v in model.state_dict().items()},
           "killed": killed, "restarts": list(cluster.budget.log), "pids": list(cluster.rollout_workers.pids),
           "start_s": started, "train_s": time.perf_counter() - t0, "cluster": cluster}
    print(f"\nray: session {env.start_seconds:.1f} s, 5 actors {started:.1f} s, 5 steps {run['train_s']:.1f} s, "
          f"restarts {run['restarts']}")
    yield run
    cluster.shutdown()


def inline_run(cfg):
    model, tokenizer, task = start(cfg)
    logger = Rows()
    accuracy = train_rl(cfg, InlineRoles.like_ray(cfg, model, tokenizer, task), task, logger)
    return logger.rows, accuracy, model.state_dict()


def test_the_run_completes_despite_a_killed_rollout_worker(ray_run):
    assert [r["step"] for r in ray_run["rows"]] == [1, 2, 3, 4, 5]
    (restart,) = ray_run["restarts"]
    assert restart["role"] == "rollout worker" and restart["worker"] == 1
    assert restart["call"] in ("generate", "load_weights")  # killed with its share out: found dead by that call
    # (or, had it finished the share within microseconds of the kill, by the weight sync that follows)
    assert ray_run["pids"][1] != ray_run["killed"]["pid"]  # a fresh process holds worker 1
    assert [r["ray/restarts"] for r in ray_run["rows"]] == [0, 0, 1, 1, 1]
    assert restart["seconds"] < 180  # a fresh actor (torch import, weights) within minutes even at 3x load


def test_metrics_and_weights_equal_the_single_process_run(ray_run, env):
    rows, accuracy, weights = inline_run(env.cfg)
    assert steady(ray_run["rows"]) == steady(rows)  # exactly: same shares, seeds and summation order
    assert ray_run["accuracy"] == accuracy
    assert all(torch.equal(ray_run["weights"][k], weights[k]) for k in weights)
    assert 0 < rows[0]["reward_mean"] < 1 and rows[-1]["grad_norm"] > 0  # a real signal was learned from


def test_data_parallel_gradient_equals_the_single_process_gradient(ray_run, env):
    cfg, cluster = env.cfg, ray_run["cluster"]
    model, tokenizer, task = start(cfg)
    model.load_state_dict(cluster.latest)  # the weights every rank holds now
    run = RLRun.local(cfg, model, tokenizer, task)
    exp, _, _ = make_experience(run, 1, PhaseTimer())
    run.learner.optimizer.zero_grad(set_to_none=True)
    actor_backward(cfg, run.learner, exp)
    expected = {n: p.grad for n, p in run.learner.policy.named_parameters()}

    def all_reduced_gradient(learner, mb):  # runs on each rank (both at once: the all-reduce needs them both)
        learner.state.optimizer.zero_grad(set_to_none=True)
        learner.gradients(mb)
        grads = {n: p.grad.detach().clone() for n, p in learner.state.policy.named_parameters()}
        learner.state.optimizer.zero_grad(set_to_none=True)
        return grads

    ref = ray.put(exp)
    rank0, rank1 = ray.get([h.__ray_call__.remote(all_reduced_gradient, ref) for h in cluster.learners.handles])
    assert all(torch.equal(rank0[n], rank1[n]) for n in expected)  # the all-reduce gives every rank the same sum
    worst = max((rank0[n] - expected[n]).abs().max().item() for n in expected)
    print(f"\nmax |DP gradient - single-process gradient| = {worst:.2e}")
    assert worst <= 1e-6


def test_a_hung_worker_is_reported_by_the_timeout(ray_run, env):
    role = ray_run["cluster"].rollout_workers
    role.ray_cfg = env.cfg.ray.model_copy(update={"timeout_s": 2.0})
    role.handles[0].__ray_call__.remote(lambda self: time.sleep(300))  # worker 0 stops answering
    t0 = time.perf_counter()
    with pytest.raises(WorkerTimeout) as err:
        role.gather([role.submit(0, "generate", ["1+2="], 7)])
    message = str(err.value)
    assert "\n" not in message and 1.9 <= time.perf_counter() - t0 < 30  # the timeout, not the 300 s sleep
    assert message.startswith(f"rollout worker 0 (pid {role.pids[0]}) did not answer generate within "
                              "ray.timeout_s=2 s"), message


def test_a_failed_collective_is_traced_to_the_dead_learner_rank(ray_run):
    """When the surviving rank's call fails first (its all-reduce broke when the peer died), the error names the
    dead rank (WorkerLost, which `posttrain rl` answers by restarting every role); with no rank dead, the
    remote error itself is raised."""
    from ray.exceptions import RayTaskError

    from posttrain.rl.roles import Call
    from posttrain.errors import WorkerLost

    role = ray_run["cluster"].learners

    def failing_call():  # rank 0's call fails with an error that is not posttrain's (as a broken gloo collective)
        return Call(0, "update", (), role.handles[0].__ray_call__.remote(lambda self: 1 / 0), time.monotonic())

    with pytest.raises(RayTaskError):
        list(role._results([failing_call()], 30.0, "ray.timeout_s", restart=True))
    os.kill(role.pids[1], signal.SIGKILL)
    with pytest.raises(WorkerLost) as err:
        list(role._results([failing_call()], 30.0, "ray.timeout_s", restart=True))
    assert (err.value.role, err.value.worker) == ("learner rank", 1)
    assert str(err.value).startswith(f"learner rank 1 (pid {role.pids[1]}) died during update")


def test_cli_backend_ray_end_to_end(env, ray_run, tmp_path, capsys):
    ray_run["cluster"].shutdown()  # done with it: its actors free the 2 CPUs for this run's
    cfg = env.cfg.model_copy(update={"output_dir": str(tmp_path / "run")})
    dump_config(cfg, tmp_path / "ray.yaml")
    code = main(["rl", str(tmp_path / "ray.yaml"), "rl.steps=2", "ray.num_rollout_workers=1", "ray.num_learners=1",
                 "ray.num_reward_workers=0"])  # scored in the driver: one actor fewer to start
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["ray"]["rollout_workers"] == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "accuracy" in rows[-1]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["backend"] == "ray"
    assert not (tmp_path / "run" / "ray").exists()  # this run joined the module's instance


def test_a_dead_learner_rank_restarts_every_role_and_resumes(env, ray_run, tmp_path, capsys, monkeypatch):
    """Learner rank 1 SIGKILLed during step 3 (its peer is blocked in the all-reduce): every role is restarted, the
    run resumes from its step-2 checkpoint, and ends with the metrics and weights of the single-process run."""
    from safetensors.torch import load_file

    import posttrain.distributed.cluster as cluster_mod

    ray_run["cluster"].shutdown()  # free the 2 CPUs
    c = env.cfg
    cfg = c.model_copy(update={
        "output_dir": str(tmp_path / "run"), "rl": c.rl.model_copy(update={"steps": 3}),
        "checkpoint": c.checkpoint.model_copy(update={"every": 1}),
        "ray": c.ray.model_copy(update={"num_rollout_workers": 1, "num_learners": 2, "num_reward_workers": 0})})
    dump_config(cfg, tmp_path / "ray.yaml")
    real, killed = cluster_mod.start_ray_cluster, {}

    def start_and_arm(*args):
        cluster = real(*args)
        kill_when_step_generates(cluster, cfg, lambda: cluster.learners.pids[1], killed)
        return cluster

    monkeypatch.setattr(cluster_mod, "start_ray_cluster", start_and_arm)
    code = main(["rl", str(tmp_path / "ray.yaml")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"learner rank 1 (pid {killed['pid']}) died during" in err, err
    assert f"(rl step {KILL_AT_STEP - 1})" in err, err  # resumed from the newest checkpoint, not from the start
    run = tmp_path / "run"
    (restart,) = json.loads((run / "summary.json").read_text())["ray"]["restarts"]
    assert (restart["role"], restart["worker"], restart["resumed"]) == ("learner rank", 1, True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # steps after the checkpoint were cut and run again
    expected_rows, accuracy, weights = inline_run(cfg)
    assert steady(rows[1:]) == steady(expected_rows) and rows[-1]["accuracy"] == accuracy
    saved = load_file(str(run / "final" / "model.safetensors"))
    assert saved and all(torch.equal(saved[k], weights[k]) for k in saved)


def test_nothing_is_left_behind(env, ray_run):
    assert env.temp == env.out.resolve() / "ray" and env.pids
    pids = env.pids | ray_processes(env.temp)  # with the actors of the runs above
    ray_run["cluster"].shutdown()
    env.close()
    assert not ray.is_initialized() and not env.temp.exists()
    deadline = time.monotonic() + 20
    while (alive := pids & set(_processes())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, {pid: _processes().get(pid) for pid in alive}
    assert ray_processes(env.temp) == set()
    assert (Path.home() / ".ray" / "auth_token").exists() == env.token_before
    assert {k: os.environ.get(k) for k in env.env_before} == env.env_before
