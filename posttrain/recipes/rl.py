"""`posttrain rl CONFIG`: online RL from `model.path` with the configured algorithm, on either backend.

    backend local   the roles in this process (posttrain.rl.roles.InlineRoles.local)
    backend ray     the roles as Ray actors (posttrain/distributed), a local instance in OUTPUT_DIR/ray unless
                    ray.address joins a cluster

Both run the one loop, posttrain/rl/loop.py `train_rl`, and write the same run directory.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from posttrain.config import RunConfig
from posttrain.errors import ConfigError, WorkerError, WorkerLost
from posttrain.rl.loop import train_rl
from posttrain.rl.roles import InlineRoles, RestartBudget
from posttrain.train.control import RunControl, finish_run, metrics_logger, open_run
from posttrain.train.run import initial_accuracy, pin_starting_model, progress_bar, start_run, write_outputs


@contextmanager
def local_roles(cfg: RunConfig, model, tokenizer, task, out, budget):
    yield InlineRoles.local(cfg, model, tokenizer, task)


@contextmanager
def ray_roles(cfg: RunConfig, model, tokenizer, task, out, budget):
    """The roles on Ray for the run's life: Ray started (or joined), the actors up, then stopped again."""
    from posttrain.distributed.cluster import ray_session, start_ray_cluster  # noqa: PLC0415 (imports Ray)

    r = cfg.ray
    with ray_session(cfg, out) as temp:
        where = (f"joined {r.address}" if r.address else f"local Ray, temporary files in {temp}" if temp
                 else "the Ray instance this process had joined")
        scoring = f"{r.num_reward_workers} reward workers" if r.num_reward_workers else "scoring in this process"
        print(f"ray: {where}; {r.num_rollout_workers} rollout workers, {scoring}, {r.num_learners} learner ranks",
              file=sys.stderr)
        roles = start_ray_cluster(cfg, model, tokenizer, task, budget)
        try:
            yield roles
        finally:
            roles.shutdown()


def run_rl(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Online RL from `model.path` (typically an SFT checkpoint) with the configured algorithm (resume: from
    the newest valid checkpoint; the starting model, which is also the reference, must be unchanged).

    backend ray: a learner rank that dies (WorkerLost) takes the run's process group and optimizer state with it:
    every role is stopped and started again, and the run resumes from its newest checkpoint (from the start if
    it has none), as `--resume` would, while ray.max_restarts lasts. Resuming is exact, so the result equals an
    uninterrupted run's; the steps since that checkpoint are computed again."""
    start = time.perf_counter()
    if cfg.backend != "ray":
        return _run_once(cfg, resume, overwrite, local_roles, RestartBudget(0), start)
    try:
        import ray  # noqa: F401, PLC0415
    except ImportError:
        raise ConfigError("backend ray needs Ray: pip install 'posttrain[ray]' (or pip install 'ray>=2.40')") from None
    from posttrain.distributed.cluster import check_address  # noqa: PLC0415

    if cfg.ray.address is not None:
        check_address(cfg.ray.address)  # before the run directory is touched
    budget = RestartBudget(cfg.ray.max_restarts)
    while True:
        try:
            return _run_once(cfg, resume, overwrite, ray_roles, budget, start)
        except WorkerLost as err:
            if budget.left <= 0:
                raise WorkerError(f"{err.label} died during {err.method} ({err.reason}) and the ray.max_restarts="
                                  f"{cfg.ray.max_restarts} restarts of this run are used up; the run stops "
                                  "(continue from the last checkpoint with --resume)") from None
            budget.left -= 1
            budget.log.append({"role": err.role, "worker": err.worker, "call": err.method, "resumed": True})
            print(f"posttrain: {err.label} died during {err.method} ({err.reason}); restarting every role and "
                  f"resuming from the newest checkpoint ({budget.left} restarts left)", file=sys.stderr)
            resume, overwrite = True, False


def _run_once(cfg: RunConfig, resume: bool, overwrite: bool, roles_for, budget: RestartBudget, start: float) -> dict:
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = start_run(cfg, min_train=cfg.rl.prompts_per_step)
    if cfg.model.path is None:
        print("note: model.path is not set, so RL starts from a randomly initialised tiny model")
    label = (cfg.rl.preset or cfg.rl.advantage).upper() + (" (ray)" if cfg.backend == "ray" else "")
    with metrics_logger(out, resumed, cfg) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        initial = initial_accuracy(cfg, ctl, logger, model, tokenizer, task, "rl")
        pin_starting_model(cfg, ctl)
        with roles_for(cfg, model, tokenizer, task, out, budget) as roles, \
                progress_bar(cfg.rl.steps, label, cfg.progress) as bar:
            accuracy = train_rl(cfg, roles, task, logger, bar, ctl)
    summary = {"initial_accuracy": initial, "rl_accuracy": accuracy, "eval_problems": len(task.eval_problems)}
    if cfg.backend == "ray":
        r = cfg.ray
        summary.update(backend="ray", ray={"rollout_workers": r.num_rollout_workers, "learners": r.num_learners,
                                           "reward_workers": r.num_reward_workers, "restarts": list(budget.log)})
    summary = write_outputs(cfg, out, model, tokenizer, summary, start, task, method="rl")
    finish_run(out)
    print(f"RL held-out accuracy {initial:.3f} -> {accuracy:.3f} on {len(task.eval_problems)} problems; "
          f"model in {out / 'final'}")
    return summary
