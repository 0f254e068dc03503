"""Built-in tasks: prompts, a verifiable reward, demonstrations for SFT and a held-out evaluation split."""

from posttrain.tasks.arithmetic import ArithmeticTask, Problem, exact_match_reward

__all__ = ["ArithmeticTask", "Problem", "exact_match_reward", "build_task"]


def build_task(cfg, seed: int) -> ArithmeticTask:
    """The task named by `cfg.name` (a TaskConfig), deterministic from `seed`."""
    if cfg.name == "arithmetic":
        return ArithmeticTask(cfg, seed)
    raise ValueError(f"task.name: unknown task {cfg.name!r}")
