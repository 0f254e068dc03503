"""Environments: what an RL trajectory talks to between the policy's turns (docs/multiturn.md).

    env = Cls(ctx, **cfg.env.kwargs)          one instance per trajectory (`env_factory`)
    opening = env.reset(problem)              the opening prompt: a rendered str, or chat messages
    obs = env.step(assistant_text)            after every assistant turn: the observation messages, or the end
    env.close()                               when the trajectory is over (optional)

A trajectory's tokens are [prompt][turn 1 sampled][obs 1 ids][turn 2 sampled]...: the driver
(posttrain/rollout/multiturn.py) samples each turn, hands its text to `step`, and appends the observation
encoded ONCE by `observation_ids`; sampled ids are never decoded and re-encoded into the sequence. Single-turn
generation is `SingleTurn`, the one-turn case of the same driver: the task's rendered prompt, done after the
first answer, scored by the task's verifier.

Token format of an observation (`observation_ids`), appended right after the turn's stop token:
  chat template   the template's own rendering of the messages after an assistant turn, with the generation
                  prompt of the next assistant turn, minus the end-of-turn token the sampled turn already ends
                  with (SmolLM2: `\\n<|im_start|>tool\\n42<|im_end|>\\n<|im_start|>assistant\\n`)
  no template     `{role}: {content}\\n` for each message (the character tokenizer: `user: no\\n`), the next
                  turn starting right after the newline

Names in `env.name`: a built-in of `BUILTIN` (loaded lazily, so a missing optional piece costs nothing until
named) or a user's class as `module:Class` / `path/to/file.py:Class` (imported as posttrain.rewards.resolve
imports reward functions; a bad name or bad kwargs is one ConfigError line naming env.name / env.kwargs).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from posttrain.config import EnvConfig
from posttrain.errors import ConfigError
from posttrain.models.chat import ASSISTANT_SENTINEL, end_of_turn_id
from posttrain.rewards.resolve import _attribute, _import

BUILTIN = {
    "single_turn": "posttrain.rollout.env:SingleTurn",
    "reflection": "posttrain.rollout.reflection:Reflection",
    "tools": "posttrain.rollout.tools:ToolEnvironment",
}


@dataclass
class Observation:
    """What the environment says after an assistant turn."""

    messages: list[dict]  # {"role": "tool" | "user", "content": str} appended after the turn; [] when done
    done: bool  # the trajectory ends here; the last assistant turn is its final answer
    reward: float | None = None  # the environment's own reward (when done); None: the task's verifier scores
    #                              the final assistant turn's text, as a single-turn rollout is scored
    info: dict = field(default_factory=dict)  # per-turn counters for logs and metrics: tool_calls, tool_errors,
    #                                           calls ([{"name", "ok", "error"}, ...])


@dataclass
class EnvContext:
    """What an environment may use; built once per rollout worker."""

    cfg: EnvConfig  # the run's `env` section
    task: object  # the run's Task (its verifier: task.reward(prompts, completions, problems)); None where unused
    tokenizer: object  # the policy's tokenizer
    chat: bool  # prompts go through the chat template (posttrain.models.chat.uses_chat_template)


class Environment:
    """The protocol; a user's class need not subclass it (reset and step are what the driver calls)."""

    def __init__(self, ctx: EnvContext, **kwargs):
        self.ctx = ctx

    def reset(self, problem) -> str | list[dict]:
        """The opening prompt: a str is an already rendered prompt, used as is; a list of messages is rendered
        with the chat template (add_generation_prompt) when ctx.chat, else their contents joined by newlines."""
        raise NotImplementedError

    def step(self, assistant_text: str) -> Observation:
        raise NotImplementedError

    def close(self) -> None:
        return None


class SingleTurn(Environment):
    """One answer per problem, scored by the task's verifier: the default, and today's single-turn rollout."""

    def reset(self, problem) -> str:
        return problem.prompt

    def step(self, assistant_text: str) -> Observation:
        return Observation([], done=True)


def resolve_env(name: str) -> type:
    """The environment class `env.name` names (a built-in or module:Class); ConfigError naming env.name."""
    spec = BUILTIN.get(name, name)
    module, sep, path = spec.partition(":")
    if not sep or not module or not path:
        raise ConfigError(f"env.name: {name!r} is neither a built-in ({', '.join(BUILTIN)}) nor 'module:Class'")
    loaded = _import(module, "env.name")
    try:
        cls = _attribute(loaded, path)
    except AttributeError:
        public = sorted(n for n, v in vars(loaded).items() if isinstance(v, type) and not n.startswith("_"))
        raise ConfigError(f"env.name: module {module} has no {path!r} (it has "
                          f"{', '.join(public[:12]) or 'no classes'})") from None
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if not callable(cls) or missing:
        raise ConfigError(f"env.name: {name!r} is not an environment class (it has no "
                          f"{' or '.join(missing) or 'constructor'} method)")
    return cls


def env_factory(ctx: EnvContext) -> Callable[[], Environment]:
    """() -> a fresh environment of ctx.cfg.name with ctx.cfg.kwargs, checked once here: the class resolves and
    its constructor takes (ctx, **kwargs)."""
    cfg = ctx.cfg
    cls = resolve_env(cfg.name)
    try:
        inspect.signature(cls).bind(ctx, **cfg.kwargs)
    except TypeError as err:
        raise ConfigError(f"env.kwargs: {cfg.name} does not take {dict(cfg.kwargs)} ({err})") from None
    except ValueError:  # no signature to inspect (a C type): the first construction tells
        pass
    kwargs = dict(cfg.kwargs)
    return lambda: cls(ctx, **kwargs)


def opening_text(tokenizer, opening: str | list[dict], chat: bool) -> str:
    """The text of an opening prompt (`Environment.reset`): a str as is; messages through the chat template with
    the generation prompt when `chat`, else their contents joined by newlines."""
    if isinstance(opening, str):
        return opening
    if chat:
        return tokenizer.apply_chat_template(list(opening), tokenize=False, add_generation_prompt=True)
    return "\n".join(str(m["content"]) for m in opening)


def cut_message(message: dict, limit: int) -> dict:
    """`message` with its content cut to `limit` characters and a note saying how much was cut."""
    content = str(message.get("content", ""))
    if len(content) <= limit:
        return {**message, "content": content}
    return {**message, "content": content[:limit] + f"... [{len(content) - limit} more characters cut]"}


def observation_text(tokenizer, messages: list[dict], chat: bool) -> str:
    """The text appended after an assistant turn's stop token for `messages` (the module docstring's format)."""
    if not chat:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    base = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ASSISTANT_SENTINEL}]
    full = tokenizer.apply_chat_template(base + list(messages), tokenize=False, add_generation_prompt=True)
    after = full.split(ASSISTANT_SENTINEL, 1)[1]
    eot = tokenizer.decode([end_of_turn_id(tokenizer)])
    return after[len(eot):] if eot and after.startswith(eot) else after


def observation_ids(tokenizer, messages: list[dict], chat: bool) -> list[int]:
    """Token ids of `observation_text`, encoded once, without added special tokens (the template's own special
    tokens in the text are single ids)."""
    return tokenizer(observation_text(tokenizer, messages, chat), add_special_tokens=False)["input_ids"]
