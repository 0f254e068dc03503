"""The `ifeval` task: verifiable instruction following in the style of IFEval (Zhou et al. 2023).

Each prompt is a short everyday request ("Describe a lighthouse for a child.") followed by one constraint that
a program can check, worded as IFEval words it: all lowercase, no commas, wrapped in double quotes, a given
closing phrase, a title in <<double angular brackets>>, fewer than N words, a P.S., required keywords. The
reward is 1 when the response follows the constraint, as IFEval's strict checker decides (the checkers are
the PyPI package `if-verifiable`, a port of google-research/instruction_following_eval), else 0.

Requests are built from topics x request templates and split before the constraints are attached, so the
held-out requests are never seen in training (only the kinds of constraint are shared). Everything is drawn
from `seed`: the same seed gives the same problems.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from posttrain.errors import ConfigError
from posttrain.rewards import RewardSet

TOPICS = [
    "a lighthouse", "the moon", "honeybees", "a rainy afternoon", "bicycles", "volcanoes", "the ocean", "coffee",
    "a public library", "autumn leaves", "trains", "the desert", "penguins", "chess", "a city park", "bread baking",
    "thunderstorms", "the night sky", "gardening", "a mountain hike", "old maps", "friendship", "recycling",
    "the first day of school", "a lost umbrella", "jazz music", "the human heart", "elephants", "snow",
    "a small bakery", "the internet", "rivers", "learning to swim", "a busy airport", "tea", "rainbows",
    "a museum visit", "owls", "wind turbines", "a camping trip", "the alphabet", "dolphins", "a birthday party",
    "pottery", "the stars", "a farmers market", "sleep", "kites", "a quiet village", "robots",
]
REQUESTS = [
    "Write a short paragraph about {t}.", "Describe {t} to a child.", "Write a short poem about {t}.",
    "Give me three fun facts about {t}.", "Write a brief story that involves {t}.",
    "Explain why people like {t}.", "Write a short product review of a book about {t}.",
    "Tell me something surprising about {t}.",
]
END_PHRASES = ["Is there anything else I can help with?", "Have a nice day.", "That is all."]
KEYWORDS = ["river", "light", "happy", "green", "window", "music", "stone", "morning", "gold", "bridge"]


def _constraints(rng: random.Random) -> list[tuple[str, dict]]:
    """Every (IFEval instruction id, its arguments) a prompt can carry, arguments drawn from `rng`."""
    return [
        ("change_case:english_lowercase", {}),
        ("punctuation:no_comma", {}),
        ("startend:quotation", {}),
        ("startend:end_checker", {"end_phrase": rng.choice(END_PHRASES)}),
        ("detectable_format:title", {}),
        ("length_constraints:number_words", {"relation": "less than", "num_words": rng.choice([20, 30, 40])}),
        ("detectable_content:postscript", {"postscript_marker": "P.S."}),
        ("keywords:existence", {"keywords": rng.sample(KEYWORDS, 2)}),
    ]


KINDS = [iid for iid, _ in _constraints(random.Random(0))]


@dataclass(frozen=True)
class InstructionProblem:
    """One request with one verifiable constraint."""

    prompt: str
    request: str
    instruction_id: str
    kwargs: dict = field(hash=False)
    id: str = ""


def _registry():
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError:
        raise ConfigError("task ifeval needs the package if-verifiable: pip install 'posttrain[real]'") from None
    try:  # language detection (the lowercase checker) is random unless seeded
        import langdetect

        langdetect.DetectorFactory.seed = 0
    except ImportError:
        pass
    return INSTRUCTION_DICT


def follows(response: str, instruction_id: str, kwargs: dict) -> bool:
    """IFEval's strict check of one instruction on one response (an empty response follows nothing)."""
    if not response.strip():
        return False
    checker = _registry()[instruction_id](instruction_id)
    checker.build_description(**kwargs)
    try:
        return bool(checker.check_following(response))
    except Exception:  # noqa: BLE001 (a checker that cannot parse the response: not followed)
        return False


def instruction_reward(prompts: list[str], completions: list[str], instruction_id: list[str],
                       instruction_kwargs: list[dict], **_) -> list[float]:
    """1.0 where the completion follows its prompt's instruction (IFEval strict), else 0.0."""
    return [float(follows(c, i, k)) for c, i, k in zip(completions, instruction_id, instruction_kwargs, strict=True)]


class InstructionsTask:
    """Requests x constraints; the held-out requests are disjoint from the training ones."""

    name = "ifeval"

    def __init__(self, seed: int = 0, num_eval: int = 320, kinds: list[str] | None = None):
        kinds = kinds or KINDS
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ConfigError(f"task.instructions: unknown instruction {unknown[0]!r}; choose from {', '.join(KINDS)}")
        _registry()
        rng = random.Random(f"ifeval-{seed}")
        requests = [r.format(t=t) for t in TOPICS for r in REQUESTS]
        rng.shuffle(requests)
        per = len(kinds)
        n_eval = min(len(requests) // 2, -(-num_eval // per))  # enough held-out requests for num_eval prompts
        held, train = requests[:n_eval], requests[n_eval:]
        self.eval_problems = self._problems(held, kinds, rng, "eval")[:num_eval]
        self.train_problems = self._problems(train, kinds, rng, "train")
        self.rewards = RewardSet({"followed": instruction_reward})

    @staticmethod
    def _problems(requests: list[str], kinds: list[str], rng: random.Random, split: str) -> list:
        out = []
        for i, request in enumerate(requests):
            for iid, kwargs in _constraints(rng):
                if iid not in kinds:
                    continue
                checker = _registry()[iid](iid)
                text = checker.build_description(**kwargs)
                out.append(InstructionProblem(f"{request} {text}", request, iid, kwargs, f"{split}:{i}:{iid}"))
        rng.shuffle(out)
        return out

    def reward_fields(self, problems) -> dict[str, list]:
        return {"instruction_id": [p.instruction_id for p in problems],
                "instruction_kwargs": [p.kwargs for p in problems]}

    def score(self, prompts, completions, problems):
        return self.rewards.score(prompts, completions, **self.reward_fields(problems))

    def reward(self, prompts, completions, problems) -> list[float]:
        return self.score(prompts, completions, problems).rewards

    def sample_prompts(self, rng: random.Random, n: int) -> list:
        return rng.sample(self.train_problems, n)

    def demonstration(self, problem, rng: random.Random) -> str:
        raise ConfigError("task ifeval has no demonstrations (it is a task for RL); use another task for SFT")
