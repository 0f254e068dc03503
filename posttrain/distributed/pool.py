"""Calling a role's workers: Ray actors with timeouts and restarts, or the same classes in this process.

    role = RayRole("rollout worker", RolloutWorker, n, (cfg, model_ref, tokenizer), options, cfg.ray, budget)
    calls = [role.submit(i, "generate", prompts_i, seed_i) for i in range(n)]
    for k, batch in role.as_completed(calls): ...          # results as they arrive; role.gather(calls): in order

A call that does not answer within ray.timeout_s raises WorkerTimeout naming the worker and the call (a hung
worker). A worker that dies (its process killed, out of memory) is replaced by a fresh actor built with the
same arguments, `on_restart` brings it up to date (the rollout workers load the current weights), and its
call is re-issued, while ray.max_restarts (shared by all roles) lasts; in a role made with restartable=False (the
learner ranks, whose optimizer state and process group cannot be rebuilt mid-step) a death raises WorkerLost,
and `posttrain rl` restarts every role from the newest checkpoint (posttrain/recipes/rl.py). A
`PosttrainError` raised inside a worker (an invariant, a data error) comes back as the same error, prefixed
with the worker's name.

`posttrain.rl.roles.InlineRole` has the same interface and runs the calls at once in this process.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from posttrain.config import RayConfig
from posttrain.errors import PosttrainError, WorkerError, WorkerLost, WorkerTimeout
from posttrain.rl.roles import Call, RestartBudget



class RayRole:
    """A role's workers as Ray actors, each reserving `options` (num_cpus, num_gpus)."""

    def __init__(self, name: str, cls, n: int, args: tuple | Callable[[int], tuple], options: dict, ray_cfg: RayConfig,
                 budget: RestartBudget, on_restart: Callable[[int, Any], None] | None = None, restartable: bool = True):
        import ray  # noqa: PLC0415

        self.name, self.args, self.ray_cfg, self.budget = name, args, ray_cfg, budget
        self.on_restart, self.restartable = on_restart, restartable
        self.options = {"CPU": options.get("num_cpus", 0.0) or 0.0, "GPU": options.get("num_gpus", 0.0) or 0.0}
        self._actor_cls = ray.remote(cls).options(max_restarts=0, max_task_retries=0, **options)
        self.handles = [self._create(i) for i in range(n)]
        self.pids: list[int | None] = [None] * n
        self.incarnations = [0] * n

    def __len__(self) -> int:
        return len(self.handles)

    def label(self, i: int) -> str:
        pid = self.pids[i]
        return f"{self.name} {i}" + (f" (pid {pid})" if pid is not None else "")

    def _create(self, i: int):
        return self._actor_cls.remote(*(self.args(i) if callable(self.args) else self.args))

    def wait_ready(self) -> None:
        """Block until every actor has started (its constructor ran), or raise WorkerTimeout."""
        calls = [Call(i, "pid", (), h.pid.remote(), time.monotonic()) for i, h in enumerate(self.handles)]
        for k, pid in self._results(calls, self.ray_cfg.startup_timeout_s, "ray.startup_timeout_s", restart=False):
            self.pids[calls[k].worker] = pid

    def put(self, obj):
        import ray  # noqa: PLC0415

        return ray.put(obj)

    def submit(self, worker: int, method: str, *args) -> Call:
        call = Call(worker, method, args)
        self._issue(call)
        return call

    def _issue(self, call: Call) -> None:
        call.ref = getattr(self.handles[call.worker], call.method).remote(*call.args)
        call.started = time.monotonic()
        call.incarnation = self.incarnations[call.worker]

    def as_completed(self, calls: list[Call]) -> Iterator[tuple[int, Any]]:
        """(index in `calls`, result) as each call finishes; dead workers restarted and their calls re-issued."""
        yield from self._results(calls, self.ray_cfg.timeout_s, "ray.timeout_s", restart=True)

    def gather(self, calls: list[Call]) -> list:
        out: list = [None] * len(calls)
        for k, result in self.as_completed(calls):
            out[k] = result
        return out

    def _results(self, calls: list[Call], timeout: float, key: str, restart: bool) -> Iterator[tuple[int, Any]]:
        import ray  # noqa: PLC0415
        from ray.exceptions import RayActorError, RayTaskError  # noqa: PLC0415

        pending = {call.ref: k for k, call in enumerate(calls)}
        while pending:
            oldest = min(pending.values(), key=lambda k: calls[k].started)
            wait = max(0.0, calls[oldest].started + timeout - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if not ready:
                call = calls[oldest]
                what = "start" if call.method == "pid" else f"answer {call.method}"
                hint = ("the cluster may lack the CPUs or GPUs the roles reserve (ray.*_cpus, ray.*_gpus)"
                        if call.method == "pid" else f"it may be hung (raise {key} if the work is only slow)")
                raise WorkerTimeout(f"{self.label(call.worker)} did not {what} within {key}={timeout:g} s; {hint}")
            k = pending.pop(ready[0])
            call = calls[k]
            try:
                result = ray.get(ready[0])
            except RayActorError as err:
                if getattr(err, "_actor_init_failed", False):  # its constructor raised: a restart would too
                    raise _init_error(self.label(call.worker), err) from None
                if not (restart and self.restartable):
                    if call.method != "pid" and not self.restartable:
                        raise WorkerLost(self.name, call.worker, self.label(call.worker), call.method,
                                         _reason(err)) from None
                    during = "while starting" if call.method == "pid" else f"during {call.method}"
                    raise WorkerError(f"{self.label(call.worker)} died {during} ({_reason(err)}); the run stops "
                                      "(continue from the last checkpoint with --resume)") from None
                if call.incarnation == self.incarnations[call.worker]:  # else: restarted for another call already
                    self._restart(call.worker, err, call.method)
                self._issue(call)
                pending[call.ref] = k
                continue
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, PosttrainError):
                    raise type(cause)(f"{self.label(call.worker)}: {cause}") from None
                if not self.restartable and (dead := self._dead_worker()) is not None:
                    # a peer in a collective died (its all-reduce broke here first): report the dead one
                    raise WorkerLost(self.name, dead, self.label(dead), call.method,
                                     f"{self.label(call.worker)}'s {call.method} failed with it") from None
                raise
            yield k, result

    def _dead_worker(self, timeout: float = 10.0) -> int | None:
        """The first of this role's actors that is dead (a call to it fails), or None. An actor still busy (e.g.
        blocked in a collective with the dead one) does not answer within `timeout` and counts as alive."""
        import ray  # noqa: PLC0415
        from ray.exceptions import GetTimeoutError, RayActorError  # noqa: PLC0415

        probes = [h.pid.remote() for h in self.handles]
        for i, ref in enumerate(probes):
            try:
                ray.get(ref, timeout=timeout)
            except RayActorError:
                return i
            except GetTimeoutError:
                continue
        return None

    def _restart(self, i: int, err: Exception, method: str) -> None:
        import ray  # noqa: PLC0415

        label = self.label(i)
        if self.budget.left <= 0:
            raise WorkerError(f"{label} died ({_reason(err)}) and the ray.max_restarts={self.ray_cfg.max_restarts} "
                              "restarts of this run are used up; the run stops") from None
        self.budget.left -= 1
        start = time.monotonic()
        try:
            ray.kill(self.handles[i], no_restart=True)
        except Exception:  # noqa: BLE001 (already gone)
            pass
        self.handles[i], self.pids[i] = self._create(i), None
        self.incarnations[i] += 1
        ready = Call(i, "pid", (), self.handles[i].pid.remote(), time.monotonic())
        for _, pid in self._results([ready], self.ray_cfg.startup_timeout_s, "ray.startup_timeout_s", restart=False):
            self.pids[i] = pid
        if self.on_restart is not None:
            self.on_restart(i, self.handles[i])
        seconds = time.monotonic() - start
        self.budget.log.append({"role": self.name, "worker": i, "call": method, "seconds": seconds})
        print(f"posttrain: {label} died ({_reason(err)}); restarted as pid {self.pids[i]} in {seconds:.1f} s, its "
              f"work re-issued ({self.budget.left} restarts left)", file=sys.stderr)

    def held(self) -> dict[str, float]:
        """What the actors known to have started reserve ({"CPU": ..., "GPU": ...})."""
        started = sum(pid is not None for pid in self.pids)
        return {k: v * started for k, v in self.options.items()}

    def shutdown(self) -> None:
        import ray  # noqa: PLC0415
        from ray.exceptions import RayError  # noqa: PLC0415

        probes = []
        for h in self.handles:
            try:
                ray.kill(h, no_restart=True)
                probes.append(h.pid.remote())  # fails once the actor is gone (and its CPUs are free again)
            except Exception:  # noqa: BLE001 (already gone)
                pass
        deadline = time.monotonic() + 10
        while probes and time.monotonic() < deadline:
            ready, probes = ray.wait(probes, num_returns=len(probes), timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                try:
                    ray.get(ref)
                except RayError:
                    pass
        self.handles = []


def _init_error(label: str, err: Exception) -> PosttrainError:
    """The error of an actor whose constructor raised: the same posttrain error (e.g. a missing optional
    dependency), or a WorkerError quoting the last line of the remote traceback."""
    import posttrain.errors  # noqa: PLC0415

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    last = next((line for line in reversed(lines) if line), type(err).__name__)
    name, _, message = last.partition(": ")
    cls = getattr(posttrain.errors, name.removeprefix("posttrain.errors."), None) if "posttrain." in name else None
    if isinstance(cls, type) and issubclass(cls, PosttrainError):
        return cls(f"{label}: {message}")
    return WorkerError(f"{label} could not start: {last}")


def _reason(err: Exception) -> str:
    """The first line of a Ray actor error, shortened."""
    text = str(err).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), type(err).__name__)
    return first if len(first) <= 160 else first[:157] + "..."
