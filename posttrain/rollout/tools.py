"""`env.name: tools`: the model may call tools (posttrain/rollout/toolbox.py) before it gives its final answer.

    reset(problem)  the opening prompt with the tool list:
                    - chat template (ctx.chat): a system message (the call syntax, an example, and each tool's
                      JSON schema on one line) before the problem's user turn; a problem whose prompt was already
                      rendered through the template (posttrain.tasks.fit_task does that) has its user text taken
                      back out of the rendering first, so the template renders the conversation once;
                    - no template (the character tokenizer): one short plain-text line before the prompt,
                      `tools: calculator(expression), python(code)\\n`, to keep tiny models' prompts short.
                    env.kwargs `instructions: "..."` replaces either text ("" for none).
    step(text)      the turn's `<tool_call>` blocks, run in order, each result one {"role": "tool"} message;
                    no call: done, the turn's text is the final answer (the task's verifier scores it, reward
                    None). A turn whose calls would bring the trajectory past env.max_tool_calls runs none of
                    them but counts them (errors "not run: past env.max_tool_calls"), so the driver
                    (posttrain/rollout/multiturn.py) truncates the trajectory there (truncated "max_tool_calls");
                    the verifier then scores a turn that is a tool call, not an answer.

Observation.info of each step: {"tool_calls": calls this turn, "tool_errors": those that failed or were not
run, "calls": [{"name", "ok", "error"}]}.
"""

from __future__ import annotations

import json

from posttrain.errors import ConfigError
from posttrain.models.chat import ASSISTANT_SENTINEL
from posttrain.rollout.env import EnvContext, Environment, Observation
from posttrain.rollout.toolbox import CLOSE, OPEN, parse_tool_calls, shared_toolbox


def chat_instructions(schemas: list[dict]) -> str:
    """The system message that shows a chat model the tools and the call syntax."""
    names = [s["function"]["name"] for s in schemas]
    if "calculator" in names:
        example = {"name": "calculator", "arguments": {"expression": "123*456"}}
    else:
        first = schemas[0]["function"]
        example = {"name": first["name"], "arguments": {k: "..." for k in first.get("parameters", {})
                                                        .get("properties", {})}}
    lines = [("You can call tools. To call one, write a JSON object with its name and arguments between "
              f"{OPEN} and {CLOSE}, for example:"), f"{OPEN}{json.dumps(example)}{CLOSE}",
             "Each result comes back in a tool message. When you know the answer, reply with it and no tool call.",
             "The tools:", *(json.dumps(s) for s in schemas)]
    return "\n".join(lines)


def plain_instructions(schemas: list[dict]) -> str:
    """One line naming each tool and its arguments, for a model without a chat template."""
    def signature(s: dict) -> str:
        params = s["function"].get("parameters", {}).get("properties", {})
        return f"{s['function']['name']}({', '.join(params)})"

    return f"tools: {', '.join(signature(s) for s in schemas)}\n"


SYSTEM_SENTINEL = "posttrain-system-sentinel"


def split_rendering(tokenizer, prompt: str) -> tuple[str | None, str] | None:
    """(system text or None, user text) of a prompt rendered through the template as `render_prompt` writes it
    (an optional system message, one user turn, the generation prompt); None when `prompt` is no such rendering."""
    for system in (False, True):
        messages = [{"role": "system", "content": SYSTEM_SENTINEL}] if system else []
        rendered = tokenizer.apply_chat_template(messages + [{"role": "user", "content": ASSISTANT_SENTINEL}],
                                                 tokenize=False, add_generation_prompt=True)
        before, after = rendered.split(ASSISTANT_SENTINEL, 1)
        head, middle = before.split(SYSTEM_SENTINEL, 1) if system else (before, "")
        if not (prompt.startswith(head) and prompt.endswith(after)):
            continue
        body = prompt[len(head):len(prompt) - len(after)]
        if not system:
            if len(prompt) >= len(head) + len(after):
                return None, body
            continue
        if middle in body:
            system_text, user = body.split(middle, 1)
            return system_text, user
    return None


class ToolEnvironment(Environment):
    """One trajectory of tool use (see the module docstring). `ctx.cfg` is the run's env section."""

    def __init__(self, ctx: EnvContext, instructions: str | None = None):
        super().__init__(ctx)
        self.cfg = ctx.cfg
        self.toolbox = shared_toolbox(ctx.cfg)
        if not self.toolbox.tools:
            raise ConfigError("env.tools: the tools environment needs at least one tool (e.g. [calculator])")
        schemas = self.toolbox.schemas
        default = chat_instructions(schemas) if ctx.chat else plain_instructions(schemas)
        self.instructions = default if instructions is None else instructions
        self.calls_used = 0

    def reset(self, problem) -> str | list[dict]:
        self.calls_used = 0
        if not self.ctx.chat:
            return self.instructions + problem.prompt
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages = getattr(problem, "messages", None)
        if messages:
            return system + list(messages)
        split = split_rendering(self.ctx.tokenizer, problem.prompt)
        if split is None:  # not rendered: the prompt is the user's turn
            return system + [{"role": "user", "content": problem.prompt}]
        task_system, text = split  # a task.system_prompt goes first, the tool instructions after it
        if task_system:
            content = "\n\n".join(x for x in (task_system, self.instructions) if x)
            system = [{"role": "system", "content": content}]
        return system + [{"role": "user", "content": text}]

    def step(self, assistant_text: str) -> Observation:
        calls = parse_tool_calls(assistant_text)
        if not calls:
            return Observation([], True, None, {"tool_calls": 0, "tool_errors": 0, "calls": []})
        self.calls_used += len(calls)
        if self.calls_used > self.cfg.max_tool_calls:  # counted, not run: the driver truncates the trajectory
            refused = [{"name": c.name, "ok": False, "error": "not run: past env.max_tool_calls"} for c in calls]
            return Observation([], False, None, {"tool_calls": len(calls), "tool_errors": len(calls),
                                                 "calls": refused})
        results = [self.toolbox.run(c) for c in calls]
        info = {"tool_calls": len(results), "tool_errors": sum(not r.ok for r in results),
                "calls": [{"name": r.name, "ok": r.ok, "error": r.error} for r in results]}
        return Observation([{"role": "tool", "content": r.content} for r in results], False, None, info)

    def close(self) -> None:
        """Nothing per trajectory: the toolbox (and its worker process) is shared by the process's trajectories."""
