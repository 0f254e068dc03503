"""Starting Ray for a run and putting the loop's roles (posttrain/rl/roles.py) on it.

    with ray_session(cfg, out):                       # a local instance in OUTPUT_DIR/ray, or ray.address
        roles = start_ray_cluster(cfg, policy, tokenizer, task)
        train_rl(cfg, roles, task, ...)               # posttrain/rl/loop.py, the loop of every backend
        roles.shutdown()
                                                      # Ray stopped, its temporary directory deleted

A local instance keeps its temporary files (sockets, logs, object spilling) in OUTPUT_DIR/ray. Ray's Unix
sockets live about 64 characters below that directory and a socket path may not exceed 107, so when
OUTPUT_DIR/ray is longer than 35 characters a fresh /tmp/posttrain-ray-XXXXXXXX is used instead; either way
it is removed when the session ends, also after an error. Ray's token authentication is kept on with a random
token passed in the environment (Ray would otherwise write ~/.ray/auth_token), and usage statistics are off.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

import socket
from datetime import timedelta

import torch.distributed as dist

from posttrain.config import RunConfig
from posttrain.distributed.pool import RayRole
from posttrain.errors import PosttrainError, WorkerTimeout
from posttrain.rl.learner import Learner
from posttrain.rl.roles import InlineRole, RestartBudget, Roles
from posttrain.rl.workers import RewardWorker, RolloutWorker

SOCKET_PATH_MAX = 107  # AF_UNIX sun_path: 108 bytes with the terminating NUL
RAY_SOCKET_SUFFIX = 64  # len("/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store")
MAX_TEMP_DIR = SOCKET_PATH_MAX - RAY_SOCKET_SUFFIX - 8  # 35, with a margin for longer socket names

_TOKEN = secrets.token_hex(32)  # this process's local instances (the token Ray caches must stay the same)
_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")


def ray_temp_dir(out: str | Path) -> tuple[Path, bool]:
    """Where a local instance keeps its temporary files: (OUTPUT_DIR/ray, False), or (a new directory under
    /tmp, True) when that path is too long for Ray's Unix sockets. OUTPUT_DIR/ray is emptied first."""
    preferred = Path(out).resolve() / "ray"
    if len(str(preferred)) <= MAX_TEMP_DIR:
        shutil.rmtree(preferred, ignore_errors=True)  # left by a run that was killed
        preferred.mkdir(parents=True)
        return preferred, False
    return Path(tempfile.mkdtemp(prefix="posttrain-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)), True


@contextmanager
def _keep_signal_handlers():
    """ray.init installs its own SIGTERM handler in the driver; keep the run's (save a checkpoint, then stop)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)


@contextmanager
def _as_posttrain_error(what: str):
    try:
        yield
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise PosttrainError(f"ray: {what}: {first}") from None


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when nothing answers at ray.address (Ray's own client retries for minutes,
    printing warnings, before it gives up). 'auto' is resolved as Ray resolves it (RAY_ADDRESS, then the
    cluster last started on this machine); 'HOST:PORT' and 'ray://HOST:PORT' get a TCP connect."""
    import socket  # noqa: PLC0415

    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address  # noqa: PLC0415
        except ImportError:  # Ray moved it: ray.init reports the failure itself
            return
        try:
            target = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError):
            target = None
        if target is None:
            raise PosttrainError("ray.address=auto: no running Ray cluster found on this machine (RAY_ADDRESS is "
                                 "not set); start one with ray start --head, or leave ray.address unset for a "
                                 "local instance")
    hostport = target.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise PosttrainError(f"ray.address={address}: expected 'auto', 'HOST:PORT' or 'ray://HOST:PORT'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise PosttrainError(f"ray.address={address}: nothing answers at {host}:{port} "
                             f"({err.strerror or type(err).__name__}); is the cluster running (ray start "
                             f"--head)?") from None


@contextmanager
def ray_session(cfg: RunConfig, out: str | Path):
    """Ray for one run: join ray.address, or start a local instance; shut it down and delete its temporary
    directory at the end, also after an error. If this process has already joined Ray, that is used and left
    running. Yields the temporary directory (None when joining a cluster or reusing a connection)."""
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        yield None
        return
    r = cfg.ray
    saved = {k: os.environ.get(k) for k in _ENV}
    temp = None
    try:
        if r.address is None:
            temp, _ = ray_temp_dir(out)
            if "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
                os.environ["RAY_AUTH_TOKEN"] = _TOKEN
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            with _keep_signal_handlers(), _as_posttrain_error("could not start a local Ray instance"):
                ray.init(num_cpus=r.cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         configure_logging=False, _temp_dir=str(temp))
        else:
            joining = f"could not join the Ray cluster at ray.address={r.address}"
            with _keep_signal_handlers(), _as_posttrain_error(joining):
                ray.init(address=r.address, log_to_driver=False, configure_logging=False)
        yield temp
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


class LearnerRank(Learner):
    """A learner as one rank of a torch.distributed process group: its `reduce` all-reduces (SUM) the gradients."""

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: an address and a free port for torch.distributed's TCP rendezvous."""
        host = socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind(("", 0))
            return host, s.getsockname()[1]

    def join(self, host: str, port: int) -> None:
        """Join the M-rank process group (gloo on CPU, NCCL on CUDA); blocks until every rank has joined."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.shares[0],
                                world_size=self.world, timeout=timedelta(seconds=self.cfg.ray.timeout_s))
        self.reduce = _all_reduce

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _all_reduce(model: torch.nn.Module, loss: float) -> float:
    """Sum the gradients (and the loss, for the finiteness check) over the ranks, in place."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n
    total = torch.tensor([loss], dtype=torch.float64, device=flat.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total)


class RayRoles(Roles):
    """Roles whose workers are Ray actors: a restarted rollout worker is brought up to date, and shutdown waits
    until Ray reports the actors' reservations free again."""

    def resync(self, i: int, handle) -> None:
        """A restarted rollout worker: load the current weights (verified) before its share is re-issued."""
        if self.weights is None:
            return  # before the first sync it holds the initial policy, as built
        import ray  # noqa: PLC0415
        from ray.exceptions import GetTimeoutError  # noqa: PLC0415

        try:
            self.verify(i, ray.get(handle.load_weights.remote(self.weights), timeout=self.cfg.ray.timeout_s))
        except GetTimeoutError:
            raise WorkerTimeout(f"restarted rollout worker {i} did not load the weights within "
                                f"ray.timeout_s={self.cfg.ray.timeout_s:g} s") from None

    def shutdown(self) -> None:
        """Stop every role and return once Ray reports their reservations free again: Ray releases a killed
        actor's CPUs asynchronously, so a run started right after (the restart after a dead rank, or the next
        run in this process) would otherwise find them still held."""
        roles = (self.rollout_workers, self.reward_workers, self.learners)
        held: dict[str, float] = {}
        for role in roles:
            if isinstance(role, RayRole):
                for kind, amount in role.held().items():
                    held[kind] = held.get(kind, 0.0) + amount
        local = any(held.values()) and self.cfg.ray.address is None and _ray_running()
        before = _available() if local else {}
        for role in roles:
            role.shutdown()
        if local:
            total = _total()
            _wait_for_resources({k: min(before.get(k, 0.0) + v, total.get(k, 0.0)) for k, v in held.items()},
                                RELEASE_WAIT_S)


RELEASE_WAIT_S = 30.0  # how long shutdown waits for Ray to report the roles' reservations free


def _reserved(cfg: RunConfig) -> dict[str, float]:
    """What the roles of `cfg` reserve on Ray, by resource kind ({"CPU": 1.5, "GPU": 0.0})."""
    r = cfg.ray
    return {"CPU": r.num_rollout_workers * r.rollout_worker_cpus + r.num_learners * r.learner_cpus
            + r.num_reward_workers * r.reward_worker_cpus,
            "GPU": r.num_rollout_workers * r.rollout_worker_gpus + r.num_learners * r.learner_gpus}


def _ray_running() -> bool:
    import ray  # noqa: PLC0415

    return ray.is_initialized()


def _available() -> dict[str, float]:
    import ray  # noqa: PLC0415

    return ray.available_resources()


def _total() -> dict[str, float]:
    import ray  # noqa: PLC0415

    return ray.cluster_resources()


def _wait_for_resources(want: dict[str, float], timeout_s: float) -> dict[str, float]:
    """Poll Ray's view of the free resources until every kind in `want` is free or `timeout_s` passes; the last
    view. Ray reports released reservations (and a new instance its resources) asynchronously."""
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    while True:
        have = _available()
        if all(have.get(k, 0.0) + 1e-9 >= v for k, v in want.items()) or time.monotonic() >= deadline:
            return have
        time.sleep(0.05)


def _check_resources(cfg: RunConfig) -> None:
    """Before any actor starts on a local instance: the roles' reservations must fit it (else they would wait).
    More than the instance has fails at once; less waits (up to ray.startup_timeout_s) for what other actors
    hold to be released, as happens right after a previous run's shutdown, before it fails."""
    r = cfg.ray
    if r.address is not None:
        return  # a cluster may grow (autoscaling): a shortage shows as actors that do not start in time
    need = {k: v for k, v in _reserved(cfg).items() if v > 0}
    total = _total()  # a local instance does not grow
    fits = all(total.get(k, 0.0) + 1e-9 >= v for k, v in need.items())
    have = _wait_for_resources(need, r.startup_timeout_s) if fits else _available()
    for kind, per_role in (("CPU", (r.rollout_worker_cpus, r.learner_cpus, r.reward_worker_cpus)),
                           ("GPU", (r.rollout_worker_gpus, r.learner_gpus, 0.0))):
        if need.get(kind, 0.0) > have.get(kind, 0.0) + 1e-9:
            where = "are free" if fits else "exist on this instance"
            free = have.get(kind, 0.0) if fits else total.get(kind, 0.0)
            raise PosttrainError(
                f"ray: the roles reserve {need[kind]:g} {kind}s ({r.num_rollout_workers} rollout workers x "
                f"{per_role[0]:g}, {r.num_learners} learners x {per_role[1]:g}, {r.num_reward_workers} reward workers "
                f"x {per_role[2]:g}) but {free:g} {where}"
                + (f" after waiting {r.startup_timeout_s:g} s (ray.startup_timeout_s)" if fits else "")
                + f"; lower ray.*_{kind.lower()}s or the worker counts" + (", or raise ray.cpus" if kind == "CPU" else ""))


def start_ray_cluster(cfg: RunConfig, policy, tokenizer, task, budget: RestartBudget | None = None) -> RayRoles:
    """The roles as Ray actors (inside `ray_session`): rollout workers, reward workers and the learner ranks, each
    built from the same initial policy, joined into one process group, then the first weight sync (verified).
    `budget`: the run's ray.max_restarts (a fresh one if None)."""
    import ray  # noqa: PLC0415

    r = cfg.ray
    _check_resources(cfg)
    budget = budget if budget is not None else RestartBudget(r.max_restarts)
    model, tok, task_ref = ray.put(policy), ray.put(tokenizer), ray.put(task)
    M = r.num_learners
    threads, device = r.threads_per_worker, "cuda" if r.learner_gpus > 0 else "cpu"
    learners = RayRole("learner rank", LearnerRank, M, lambda i: (cfg, model, tok, task_ref, [i], M, threads, device),
                       {"num_cpus": r.learner_cpus, "num_gpus": r.learner_gpus}, r, budget, restartable=False)
    rollout = RayRole("rollout worker", RolloutWorker, r.num_rollout_workers, (cfg, model, tok, threads),
                      {"num_cpus": r.rollout_worker_cpus, "num_gpus": r.rollout_worker_gpus}, r, budget)
    if r.num_reward_workers > 0:
        reward = RayRole("reward worker", RewardWorker, r.num_reward_workers, (cfg, tok, task_ref, threads),
                         {"num_cpus": r.reward_worker_cpus}, r, budget)
    else:  # scored in this process, as each share arrives
        reward = InlineRole("reward worker", RewardWorker, 1, (cfg, tokenizer, task))
    cluster = RayRoles(cfg, tokenizer, policy, rollout, reward, learners, [[i] for i in range(M)], budget)
    rollout.on_restart = cluster.resync
    try:
        for role in (learners, rollout, reward):
            if isinstance(role, RayRole):
                role.wait_ready()
        if M > 1:
            host, port = learners.gather([learners.submit(0, "rendezvous")])[0]
            learners.gather([learners.submit(i, "join", host, port) for i in range(M)])
        cluster.sync()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster

