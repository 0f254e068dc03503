"""Tools for multi-turn rollouts: typed Python functions, the schema the model sees, the call syntax, running a call.

A tool is a function with type hints and a Google-style docstring (a description, and an `Args:` line per
argument); its name, docstring and signature give the JSON schema shown to the model
(`transformers.utils.get_json_schema`, the schema chat templates with tool support take):

    def lookup(key: str, limit: int = 3) -> str:
        \"\"\"Look a key up in the table.

        Args:
            key: The key to find.
            limit: Most rows returned.
        \"\"\"

Config names the tools as `env.tools: [calculator, python, "my_tools:lookup", "tools.py:lookup"]`: the built-ins
(posttrain/rollout/builtin_tools.py) or a `module:function` / `file.py:function` (resolved as rl.reward_funcs
are, posttrain/rewards/resolve.py). A function without type hints or an `Args:` description is a ConfigError
naming the entry.

**Call syntax** (for every model: SmolLM2's template, and the character tokenizer, have no tool syntax of their
own): a JSON object with the tool's name and its arguments inside `<tool_call>...</tool_call>`, anywhere in the
assistant's turn; several calls in one turn run in order:

    <tool_call>{"name": "calculator", "arguments": {"expression": "123*456"}}</tool_call>

`arguments` may also be a JSON string holding the object (the OpenAI wire format). Each call's result is one
observation message `{"role": "tool", "content": text}`; a call that cannot run gets `"error: <one line>"` as its
content instead, and the trajectory goes on: bad JSON, no `name`, an unclosed `<tool_call>`, an unknown tool,
arguments that do not match the schema (missing, unknown or of the wrong JSON type), a tool that raises, one
that runs past `env.tool_timeout_s`. A result longer than `env.max_observation_chars` is cut, with a note, to
that many characters in all (so the driver's own cut at the same limit leaves it as is).

Where a tool runs: `calculator` in this process (it is bounded by its own limits); `python` in the sandbox
(another process, limited, killed at env.tool_timeout_s); a user's tool in a `ToolWorker` child process that is
killed and replaced when a call times out (posttrain/rollout/tool_worker.py).
"""

from __future__ import annotations

import difflib
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from posttrain.errors import ConfigError
from posttrain.rewards.resolve import resolve_reward
from posttrain.rollout.builtin_tools import calculator, python_tool
from posttrain.rollout.tool_worker import ToolWorker, cut, run_tool
from posttrain.sandbox import SandboxConfig

BUILTIN_TOOLS = ("calculator", "python")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
               "object": (dict,), "null": (type(None),)}


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters": {...}}}
    isolated: bool  # True: runs in the ToolWorker child process (user tools); False: here (built-ins)

    @property
    def parameters(self) -> dict:
        return self.schema["function"].get("parameters", {"type": "object", "properties": {}})


@dataclass(frozen=True)
class ToolCall:
    """One `<tool_call>` block of an assistant turn: a name and arguments, or the reason it could not be read."""

    text: str  # the block's content as written
    name: str | None = None
    arguments: dict | None = None
    error: str | None = None


@dataclass(frozen=True)
class ToolResult:
    name: str | None  # None: the call had no readable name
    ok: bool
    content: str  # what the model reads: the result, or "error: ..."
    error: str | None = None  # the one-line reason when not ok


def tool_schema(fn: Callable, key: str = "env.tools") -> dict:
    """The JSON schema of a typed, documented function (transformers' get_json_schema); ConfigError naming `key`
    when it has no type hints or no description of an argument."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:  # noqa: BLE001 - DocstringParsingException, TypeHintParsingException, ...
        raise ConfigError(f"{key}: cannot build the tool's schema: {exc} (a tool needs type hints and a docstring "
                          "with an Args: line per argument)") from None


def load_tools(specs: Sequence[str], timeout_s: float, key: str = "env.tools") -> list[Tool]:
    """The tools `specs` names (built-in names or module:function specs); ConfigError naming `key[i]`."""
    tools: dict[str, Tool] = {}
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        if spec == "calculator":
            tool = Tool("calculator", calculator, tool_schema(calculator, where), isolated=False)
        elif spec == "python":
            fn = python_tool(SandboxConfig(timeout_s=timeout_s))
            tool = Tool("python", fn, tool_schema(fn, where), isolated=False)
        elif ":" in spec:
            fn = resolve_reward(spec, where)
            schema = tool_schema(fn, where)
            tool = Tool(schema["function"]["name"], fn, schema, isolated=True)
        else:
            near = difflib.get_close_matches(spec, BUILTIN_TOOLS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{where}: '{spec}' is not a built-in tool{hint}; the built-ins are "
                              f"{', '.join(BUILTIN_TOOLS)}, or name a function as 'module:function'")
        if tool.name in tools:
            raise ConfigError(f"{where}: a second tool named '{tool.name}'")
        tools[tool.name] = tool
    return list(tools.values())


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The `<tool_call>` blocks of an assistant turn, in order; an opening tag never closed is a call with an
    error. [] when the turn calls no tool (its text is the final answer)."""
    calls = [_parse_call(m.group(1)) for m in _CALL.finditer(text)]
    tail = text[text.rfind(CLOSE) + len(CLOSE):] if CLOSE in text else text
    if OPEN in tail:
        calls.append(ToolCall(tail[tail.index(OPEN) + len(OPEN):], error=f"{OPEN} without {CLOSE}"))
    return calls


def _parse_call(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        return ToolCall(body, error=f"the call is not valid JSON ({exc})")
    if not isinstance(obj, dict):
        return ToolCall(body, error=f"the call is a JSON {_json_name(obj)}, not an object with name and arguments")
    name, arguments = obj.get("name"), obj.get("arguments", {})
    if not isinstance(name, str) or not name:
        return ToolCall(body, error='the call has no "name" (a string)')
    if isinstance(arguments, str):  # the OpenAI wire format: arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            return ToolCall(body, name, error=f'"arguments" is a string that is not valid JSON ({exc})')
    if not isinstance(arguments, dict):
        return ToolCall(body, name, error=f'"arguments" is a JSON {_json_name(arguments)}, not an object')
    return ToolCall(body, name, arguments)


def _json_name(value) -> str:
    return next((k for k, types in _JSON_TYPES.items() if type(value) in types and k != "number"), "value")


def check_arguments(parameters: dict, arguments: dict) -> str | None:
    """Why `arguments` do not fit the tool's `parameters` schema (missing, unknown, wrong JSON type), or None."""
    properties = parameters.get("properties", {})
    missing = [n for n in parameters.get("required", []) if n not in arguments]
    if missing:
        return f"missing argument '{missing[0]}'" + _takes(properties)
    for name, value in arguments.items():
        if name not in properties:
            return f"unknown argument '{name}'" + _takes(properties)
        wrong = _type_error(properties[name], value, name)
        if wrong:
            return wrong
    return None


def _takes(properties: dict) -> str:
    return f" (takes {', '.join(properties)})" if properties else " (takes no arguments)"


def _type_error(schema: dict, value, where: str) -> str | None:
    """The first mismatch of `value` against a property schema of get_json_schema's subset, or None."""
    if value is None and schema.get("nullable"):
        return None
    if "enum" in schema and value not in schema["enum"]:
        return f"argument '{where}' must be one of {schema['enum']}, got {value!r}"
    kinds = schema.get("type")
    if kinds is None:  # Any
        return None
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    allowed = tuple(t for k in kinds for t in _JSON_TYPES.get(k, (object,)))
    if not isinstance(value, allowed) or (isinstance(value, bool) and "boolean" not in kinds):
        return f"argument '{where}' must be {' or '.join(kinds)}, got {json.dumps(value)[:40]}"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            wrong = _type_error(schema["items"], item, f"{where}[{i}]")
            if wrong:
                return wrong
    return None


class Toolbox:
    """The run's tools, and running one parsed call: never raises for anything the model or a tool does."""

    def __init__(self, tools: Sequence[Tool], timeout_s: float, max_chars: int):
        self.tools = {t.name: t for t in tools}
        self.timeout_s, self.max_chars = timeout_s, max_chars
        isolated = {t.name: t.fn for t in tools if t.isolated}
        self.worker = ToolWorker(isolated, max_chars) if isolated else None

    @classmethod
    def from_config(cls, cfg) -> Toolbox:
        """From the `env` section: env.tools, env.tool_timeout_s, env.max_observation_chars."""
        return cls(load_tools(cfg.tools, cfg.tool_timeout_s), cfg.tool_timeout_s, cfg.max_observation_chars)

    @property
    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools.values()]

    def run(self, call: ToolCall) -> ToolResult:
        if call.error is not None:
            return self._error(call.name, call.error)
        tool = self.tools.get(call.name)
        if tool is None:
            return self._error(call.name, f"unknown tool '{call.name}'; the tools are {', '.join(self.tools)}")
        wrong = check_arguments(tool.parameters, call.arguments)
        if wrong:
            return self._error(call.name, f"{call.name}: {wrong}")
        if tool.isolated:
            ok, text = self.worker.call(tool.name, call.arguments, self.timeout_s)
        else:
            ok, text = run_tool(tool.fn, call.arguments, self.max_chars)
        return ToolResult(call.name, True, text) if ok else self._error(call.name, f"{call.name}: {text}")

    def _error(self, name: str | None, error: str) -> ToolResult:
        error = " ".join(error.split())
        return ToolResult(name, False, cut(f"error: {error}", self.max_chars, sep=" "), error[:self.max_chars])

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


_SHARED: dict[tuple, Toolbox] = {}
_SHARED_LOCK = threading.Lock()


def shared_toolbox(cfg) -> Toolbox:
    """One Toolbox (and one tool worker process) per distinct (env.tools, env.tool_timeout_s,
    env.max_observation_chars) in this process: environments are made per trajectory, their tools once."""
    key = (tuple(cfg.tools), float(cfg.tool_timeout_s), int(cfg.max_observation_chars))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Toolbox.from_config(cfg)
        return _SHARED[key]
