"""Tools (posttrain/rollout/toolbox.py, builtin_tools.py, tool_worker.py): schema, call syntax, the calculator, the
python tool in the sandbox, and every failure mode becoming an error message while the next call still works."""

from __future__ import annotations

import os
import time

import pytest

from posttrain.errors import ConfigError
from posttrain.rollout.builtin_tools import ToolError, calculator, python_tool
from posttrain.rollout.toolbox import (
    Tool,
    Toolbox,
    ToolCall,
    load_tools,
    parse_tool_calls,
    tool_schema,
)
from posttrain.sandbox import SandboxConfig, run_program


def multiply(a: int, b: int, note: str | None = None) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
        note: Ignored.
    """
    return a * b


def slow(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "awake"


def explode() -> str:
    """Always raises."""
    raise RuntimeError("boom\nsecond line")


def flood() -> str:
    """Returns 10 MB."""
    return "x" * (10 << 20)


def whoami() -> int:
    """The process id this tool runs in."""
    return os.getpid()


def die() -> str:
    """Kills its own process."""
    os._exit(3)


def user_tool(fn) -> Tool:
    return Tool(fn.__name__, fn, tool_schema(fn), isolated=True)


@pytest.fixture
def toolbox():
    box = Toolbox([Tool("calculator", calculator, tool_schema(calculator), isolated=False),
                   *(user_tool(f) for f in (multiply, slow, explode, flood, whoami, die))],
                  timeout_s=1.0, max_chars=200)
    yield box
    box.close()


def call(name, **arguments) -> ToolCall:
    return ToolCall("", name, arguments)


def test_schema_from_a_typed_function():
    schema = tool_schema(multiply)
    fn = schema["function"]
    assert fn["name"] == "multiply" and fn["description"] == "Multiply two integers."
    assert fn["parameters"]["properties"]["a"] == {"type": "integer", "description": "The first factor."}
    assert fn["parameters"]["properties"]["note"]["nullable"] is True
    assert fn["parameters"]["required"] == ["a", "b"]


def test_untyped_or_undocumented_function_is_a_config_error():
    def untyped(x):
        """No hints.

        Args:
            x: Something.
        """

    def undocumented(x: int) -> int:
        """No Args section."""

    for fn in (untyped, undocumented):
        with pytest.raises(ConfigError, match=r"env.tools\[2\]: cannot build the tool's schema"):
            tool_schema(fn, "env.tools[2]")


def test_load_tools_builtins_files_and_bad_names(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text("def shout(text: str) -> str:\n    '''Upper-case text.\n\n    Args:\n        text: Input.\n    '''\n"
                    "    return text.upper()\n")
    tools = load_tools(["calculator", "python", f"{path}:shout"], timeout_s=2.0)
    assert [(t.name, t.isolated) for t in tools] == [("calculator", False), ("python", False), ("shout", True)]
    with pytest.raises(ConfigError, match=r"env.tools\[0\]: 'calculater' is not a built-in tool \(did you mean "
                                          r"'calculator'\?\)"):
        load_tools(["calculater"], timeout_s=1.0)
    with pytest.raises(ConfigError, match=r"env.tools\[1\]: no such file"):
        load_tools(["calculator", str(tmp_path / "nope.py") + ":f"], timeout_s=1.0)
    with pytest.raises(ConfigError, match=r"env.tools\[1\]: a second tool named 'calculator'"):
        load_tools(["calculator", "calculator"], timeout_s=1.0)


def test_parse_tool_calls():
    text = ('Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call> and '
            '<tool_call>{"name": "multiply", "arguments": "{\\"a\\": 2, \\"b\\": 5}"}</tool_call>')
    first, second = parse_tool_calls(text)
    assert (first.name, first.arguments, first.error) == ("calculator", {"expression": "2*3"}, None)
    assert (second.name, second.arguments, second.error) == ("multiply", {"a": 2, "b": 5}, None)
    assert parse_tool_calls("56088") == []
    bad = parse_tool_calls("<tool_call>{name: calculator}</tool_call><tool_call>[1]</tool_call>"
                           '<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "x", "arguments": 3}'
                           '</tool_call><tool_call>{"name": "calculator"')
    assert [c.error.split(" (")[0] for c in bad] == [
        "the call is not valid JSON", "the call is a JSON array, not an object with name and arguments",
        'the call has no "name"', '"arguments" is a JSON integer, not an object',
        "<tool_call> without </tool_call>"]
    assert parse_tool_calls('<tool_call>{"name": "f"}</tool_call>')[0].arguments == {}


@pytest.mark.parametrize("expression, value", [
    ("123*456", "56088"), ("7/2", "3.5"), ("-(2+3)**2", "-25"), ("17//5", "3"), ("17%5", "2"), ("2**-1", "0.5"),
    (" 1.5 + +2 ", "3.5"), ("(((4)))", "4"), ("9999*9999", "99980001"), ("2**100", str(2 ** 100))])
def test_calculator_values(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("__import__('os')", "found Call"), ("9**9**9", "exponent 387420489 is larger than 1000"),
    ("10**999*10**999", "more than 1000 digits"), ("(2**999)**4", "would have more than 1000 digits"),
    ("x+1", "found Name"), ("(1).__class__", "found Attribute"), ("1/0", "division by zero"),
    ("lambda: 1", "found Lambda"), ("[1, 2]", "found List"), ("True+1", "found Constant"), ("1e308*10", "too large"),
    ("(-8)**0.5", "not a real number"), ("1+", "not an arithmetic expression"), ("1" * 600, "longer than 500"),
    ("+".join(["1"] * 150), "more than 200 parts"), ("'a'*3", "found Constant")])
def test_calculator_refuses_unsafe_or_unbounded_input(expression, error):
    started = time.perf_counter()
    with pytest.raises(ToolError, match=error.replace("(", r"\(").replace("*", r"\*")):
        calculator(expression)
    assert time.perf_counter() - started < 1.0


def test_every_failure_becomes_an_error_and_the_next_call_works(toolbox):
    """Each failure mode: its error message, then a good call through the same toolbox still answers."""
    failures = {
        "bad json": (parse_tool_calls("<tool_call>{oops</tool_call>")[0], "error: the call is not valid JSON"),
        "unknown tool": (call("divide", a=1), "error: unknown tool 'divide'; the tools are calculator, multiply"),
        "missing argument": (call("multiply", a=1), "error: multiply: missing argument 'b' (takes a, b, note)"),
        "unknown argument": (call("multiply", a=1, b=2, c=3), "error: multiply: unknown argument 'c'"),
        "wrong type": (call("multiply", a="7", b=2), "error: multiply: argument 'a' must be integer, got \"7\""),
        "bool is no integer": (call("multiply", a=True, b=2), "error: multiply: argument 'a' must be integer"),
        "raises": (call("explode"), "error: explode: RuntimeError: boom second line"),
        "timeout": (call("slow", seconds=30), "error: slow: timed out after 1 s (env.tool_timeout_s)"),
        "dies": (call("die"), "error: die: the tool's process died during the call (exit code 3)"),
        "calculator refuses": (call("calculator", expression="__import__('os')"), "error: calculator: only numbers"),
    }
    for what, (bad, message) in failures.items():
        started = time.perf_counter()
        result = toolbox.run(bad)
        assert not result.ok and result.content.startswith(message), (what, result.content)
        assert result.error and "\n" not in result.error, what
        assert time.perf_counter() - started < 5.0, what  # the 30 s sleep was stopped at the 1 s limit
        good = toolbox.run(call("multiply", a=12, b=34))
        assert (good.ok, good.content) == (True, "408"), what
    assert toolbox.worker.restarts == 2  # replaced after the timeout and after the death


def test_ten_megabytes_are_cut_with_a_note(toolbox):
    result = toolbox.run(call("flood"))
    assert result.ok
    note = f"\n[output cut: {10 << 20} characters, the first 145 shown]"
    assert result.content == "x" * 145 + note and len(result.content) == 200
    assert toolbox.run(call("calculator", expression="2+2")).content == "4"


def test_user_tools_run_in_another_process_that_a_timeout_replaces(toolbox):
    first = int(toolbox.run(call("whoami")).content)
    assert first != os.getpid() and first == toolbox.worker.pid
    assert not toolbox.run(call("slow", seconds=10)).ok
    second = int(toolbox.run(call("whoami")).content)
    assert second not in (first, os.getpid())
    assert toolbox.run(call("slow", seconds=0)).content == "awake"


@pytest.fixture(scope="module")
def sandbox_works():
    if run_program("pass", config=SandboxConfig(timeout_s=5)).status != "passed":
        pytest.skip("the sandbox cannot run programs on this machine (see tests/sandbox)")


def test_python_tool_runs_in_the_sandbox(sandbox_works):
    python = python_tool(SandboxConfig(timeout_s=5))
    assert python("print(6*7)") == "42"
    assert int(python("import os\nprint(os.getpid())")) != os.getpid()
    with pytest.raises(ToolError, match="runtime_error: program: NameError"):
        python("print(undefined_name)")
    box = Toolbox(load_tools(["python"], timeout_s=1.0), timeout_s=1.0, max_chars=200)
    started = time.perf_counter()
    result = box.run(call("python", code="while True:\n    pass"))
    assert result.content == "error: python: timeout: wall-clock timeout after 1 s"
    assert time.perf_counter() - started < 5.0
    assert box.run(call("python", code="print('again')")).content == "again"
