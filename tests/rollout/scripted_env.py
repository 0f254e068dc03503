"""A user-style environment for the tests (named by path: `tests/rollout/scripted_env.py:Scripted`)."""

from posttrain.rollout.env import Observation


class Scripted:
    """Answers every assistant turn with `{role}: turn k` until `turns` answers are in; then done with `reward`
    (None: the task's verifier scores the last answer). Counts `tool_calls` calls per step and keeps every text
    it was given in `seen`."""

    def __init__(self, ctx, turns: int = 3, role: str = "tool", reward: float | None = None, tool_calls: int = 0):
        self.ctx, self.turns, self.role, self.reward, self.tool_calls = ctx, turns, role, reward, tool_calls
        self.seen: list[str] = []

    def reset(self, problem) -> str:
        self.seen = []
        return problem.prompt

    def step(self, assistant_text: str) -> Observation:
        self.seen.append(assistant_text)
        info = {"tool_calls": self.tool_calls, "tool_errors": 0, "calls": [{"name": "t", "ok": True}] * self.tool_calls}
        if len(self.seen) >= self.turns:
            return Observation([], done=True, reward=self.reward, info=info)
        return Observation([{"role": self.role, "content": f"turn {len(self.seen)}"}], done=False, info=info)
