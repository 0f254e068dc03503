"""A child process that runs user tools, so that a tool that hangs can be stopped without stopping the trainer.

    worker = ToolWorker({"lookup": lookup}, max_chars=2000)
    ok, text = worker.call("lookup", {"key": "x"}, timeout_s=10)   # (True, result) or (False, one-line error)
    worker.close()

The child is forked (multiprocessing's "fork" context) on the first call, so it has the tool functions without
pickling them (a `file.py:function`, a closure, a lambda all work). Calls go over a pipe one at a time (a lock
serialises callers of one worker). The child converts the result to text and cuts it to `max_chars` before
sending it back, so a tool that returns 10 MB sends ~max_chars. A call that does not answer within `timeout_s` is
answered with an error; the child is killed (SIGKILL) and the next call forks a fresh one. A child that dies (a
tool that calls os._exit, a segfault) is reported the same way and replaced. The child ignores SIGINT (the
trainer handles Ctrl-C), writes its stdout to /dev/null (a chatty tool does not flood the trainer's console),
and exits when the trainer does: it is a daemon process, and a closed pipe ends its loop.

User tools are the user's own trusted code (as reward functions are); the child is not a sandbox. Model-written
code goes through the `python` tool, which runs it in posttrain/sandbox.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

from posttrain.rollout.builtin_tools import ToolError


def result_text(value) -> str:
    """What a tool's return value shows the model: a str as is, None as "(no output)", anything else as
    JSON when it is JSON-serialisable, else its repr."""
    import json

    if isinstance(value, str):
        return value
    if value is None:
        return "(no output)"
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def cut(text: str, max_chars: int, sep: str = "\n") -> str:
    """`text` if it has at most `max_chars` characters, else its head and, after `sep`, a note saying how much was
    cut, `max_chars` characters in all (the note alone where it does not leave room for text)."""
    if len(text) <= max_chars:
        return text
    note = f"[output cut: {len(text)} characters, the first {{}} shown]"
    keep = max(0, max_chars - len(sep) - len(note.format(max_chars)))
    return f"{text[:keep]}{sep}{note.format(keep)}"


def run_tool(fn: Callable, arguments: dict, max_chars: int) -> tuple[bool, str]:
    """Call `fn(**arguments)`: (True, its result as text, cut) or (False, "ExceptionType: message")."""
    try:
        return True, cut(result_text(fn(**arguments)), max_chars)
    except ToolError as exc:
        return False, _one_line(str(exc), max_chars)
    except Exception as exc:  # noqa: BLE001 - any failure of a tool becomes the model's error message
        return False, _one_line(f"{type(exc).__name__}: {exc}", max_chars)


def _one_line(text: str, max_chars: int) -> str:
    return cut(" ".join(text.split()), max_chars, sep=" ")


def _serve(conn, tools: dict[str, Callable], max_chars: int) -> None:
    """The child's loop: (name, arguments) in, (ok, text) out, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    while True:
        try:
            name, arguments = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(run_tool(tools[name], arguments, max_chars))
        except (BrokenPipeError, OSError):
            return


class ToolWorker:
    """Runs `tools` (name -> function) in a forked child process, one call at a time (see the module docstring)."""

    def __init__(self, tools: dict[str, Callable], max_chars: int):
        self.tools, self.max_chars = dict(tools), max_chars
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self.restarts = 0  # children killed after a timeout or found dead

    def _start(self) -> None:
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe()
        self._proc = context.Process(target=_serve, args=(child, self.tools, self.max_chars), daemon=True,
                                     name="posttrain-tools")
        self._proc.start()
        child.close()
        self._conn = parent

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.join()
            self._conn.close()
        self._proc = self._conn = None

    @property
    def pid(self) -> int | None:
        """The child's process id (None before the first call and after a kill)."""
        return self._proc.pid if self._proc is not None else None

    def call(self, name: str, arguments: dict, timeout_s: float) -> tuple[bool, str]:
        """(True, result text) or (False, one-line error); never raises for anything the tool does."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                if self._proc is not None:
                    self._kill()
                    self.restarts += 1
                self._start()
            try:
                self._conn.send((name, arguments))
                if self._conn.poll(timeout_s):
                    return self._conn.recv()
            except (EOFError, OSError):  # the child died during the call
                self._proc.join(1.0)
                code = self._proc.exitcode
                self._kill()
                self.restarts += 1
                return False, f"the tool's process died during the call (exit code {code})"
            self._kill()
            self.restarts += 1
            return False, f"timed out after {timeout_s:g} s (env.tool_timeout_s)"

    def close(self) -> None:
        with self._lock:
            self._kill()
