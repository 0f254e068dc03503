"""Self-reflection (`env.name: reflection`): answer, hear that the answer is wrong, reconsider, answer again.

After each answer the task's verifier scores it (task.reward on the problem, as a single-turn rollout is
scored). A score >= `threshold` ends the trajectory; so does the env.max_attempts-th answer. Otherwise the
feedback message is appended as the user's turn and the model answers again. The trajectory's reward is its
final attempt's score, discounted per extra attempt:

    reward = score(answer_k) * attempt_discount ** (k - 1)        k = attempts made, 1 <= k <= env.max_attempts

so with attempt_discount = 1 a right answer counts the same at any attempt, and below 1 a first-attempt right
answer is worth more. Info per turn: {"attempt": k, "score": s, "correct": bool} (the rollout log shows it).

kwargs (env.kwargs): feedback (the message after a wrong answer; default "That is not correct. Reconsider and
answer again."), threshold (the score that counts as right; default 1.0).
"""

from __future__ import annotations

from posttrain.errors import ConfigError
from posttrain.rollout.env import EnvContext, Environment, Observation

FEEDBACK = "That is not correct. Reconsider and answer again."


class Reflection(Environment):
    def __init__(self, ctx: EnvContext, feedback: str = FEEDBACK, threshold: float = 1.0):
        super().__init__(ctx)
        if ctx.task is None:
            raise ConfigError("env.name=reflection needs the run's task (its verifier scores every attempt)")
        if not isinstance(feedback, str):
            raise ConfigError(f"env.kwargs.feedback must be a string, got {feedback!r} (YAML reads no, yes, on and "
                              "off as booleans: quote them)")
        self.feedback, self.threshold = feedback, float(threshold)
        self.max_attempts, self.discount = ctx.cfg.max_attempts, ctx.cfg.attempt_discount
        self.problem, self.attempts = None, 0

    def reset(self, problem) -> str:
        self.problem, self.attempts = problem, 0
        return problem.prompt

    def score(self, text: str) -> float:
        """The task's verifier on one answer to this problem."""
        return float(self.ctx.task.reward([self.problem.prompt], [text], [self.problem])[0])

    def step(self, assistant_text: str) -> Observation:
        self.attempts += 1
        score = self.score(assistant_text)
        correct = score >= self.threshold
        info = {"attempt": self.attempts, "score": score, "correct": correct}
        if correct or self.attempts >= self.max_attempts:
            return Observation([], done=True, reward=score * self.discount ** (self.attempts - 1), info=info)
        return Observation([{"role": "user", "content": self.feedback}], done=False, info=info)
