"""The built-in tools of `env.tools`: `calculator` (safe arithmetic) and `python` (code run in the sandbox).

    calculator(expression)   "123*456" -> "56088". The expression is parsed with `ast` (never `eval`): numbers
                             (int, float), + - * / // % **, unary + and -, parentheses; nothing else. Limits keep
                             it bounded, so it runs in the trainer's process: at most MAX_EXPRESSION_CHARS
                             characters and MAX_NODES syntax nodes; an exponent of at most MAX_EXPONENT in
                             magnitude; every intermediate integer below 10**MAX_DIGITS (a power is checked before
                             it is computed: 9**9**9 is refused, not attempted).
    python(code)             runs `code` with `posttrain.sandbox.run_program` (a fresh, limited interpreter in
                             another process, wall-clock limit env.tool_timeout_s) and returns what it printed; a
                             program that fails returns its status and error line as the tool's error.

Both raise `ToolError` with a one-line message for anything they refuse; the caller (posttrain/rollout/toolbox.py)
turns it into an error message for the model.
"""

from __future__ import annotations

import ast
import math
import operator

from posttrain.sandbox import SandboxConfig, run_program

MAX_EXPRESSION_CHARS = 500
MAX_NODES = 200
MAX_EXPONENT = 1000
MAX_DIGITS = 1000


class ToolError(Exception):
    """A tool's refusal or failure, in one line the model reads."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return its value.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "123*456" or "(2+3)**2".
    """
    if not isinstance(expression, str):
        raise ToolError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression[:80]!r}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError(f"expression has more than {MAX_NODES} parts")
    value = _evaluate(tree.body)
    return repr(value) if isinstance(value, float) else str(value)


def _evaluate(node: ast.expr) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ToolError(f"division by zero in {_SYMBOL[type(node.op)]}") from None
        except OverflowError:
            raise ToolError("result too large for a float") from None
    what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
    raise ToolError(f"only numbers, + - * / // % ** and parentheses are allowed (found {what})")


def _check_power(base: float, exponent: float) -> None:
    """Refuse a power whose exponent or result would be too large, before computing it."""
    if isinstance(exponent, complex) or abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponent {exponent!r} is larger than {MAX_EXPONENT} in magnitude")
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
            and exponent * math.log10(abs(base)) >= MAX_DIGITS):
        raise ToolError(f"result of {base}**{exponent} would have more than {MAX_DIGITS} digits")


def _bounded(value: complex) -> float:
    if isinstance(value, complex):  # (-8)**0.5
        raise ToolError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_DIGITS * math.log2(10):
        raise ToolError(f"an intermediate result has more than {MAX_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):  # 1e308*10 is inf, not an OverflowError
        raise ToolError("result too large for a float")
    return value


def python_tool(config: SandboxConfig):
    """The `python` tool: a function of `code` alone (its schema is what the model sees) that runs it under
    `config`."""

    def python(code: str) -> str:
        """Run Python code in a sandbox and return what it prints (use print to see a value).

        Args:
            code: A Python program; its standard output is the result.
        """
        return sandboxed_python(code, config)

    return python


def sandboxed_python(code: str, config: SandboxConfig) -> str:
    """`python`'s implementation: `code` run by `posttrain.sandbox.run_program` under `config`; its stdout, or a
    ToolError with the run's status, error line and the last line of its stderr."""
    if not isinstance(code, str):
        raise ToolError(f"code must be a string, got {type(code).__name__}")
    result = run_program(code, config=config)
    if not result.passed:
        last = (result.stderr.strip().splitlines() or [""])[-1]
        detail = f" ({last})" if last and last not in result.error else ""
        raise ToolError(f"{result.status}: {result.error}{detail}")
    out = result.stdout.rstrip("\n")
    return out if out else "(no output)"
