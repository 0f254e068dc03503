"""Run untrusted Python in a separate, limited process: `run_program`, and the MBPP and HumanEval layouts.

The code never runs in the caller's process. Each call starts a fresh interpreter (`python -I -S`, scrubbed
environment) on `_runner.py`, behind the isolation `isolation.py` finds, and reads back what it reported.
Thread-safe: no `preexec_fn`, so a thread pool may call these concurrently (see pool.py).
"""

from __future__ import annotations

import ast
import marshal
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from posttrain.sandbox.config import ExecResult, SandboxConfig
from posttrain.sandbox.isolation import (
    allocate_uid,
    command_prefix,
    isolation_mode,
    kill_uid,
)

RUNNER = Path(__file__).with_name("_runner.py")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
DEFAULT = SandboxConfig()


def run_program(program: str, tests: Sequence[str] = (), setup: str = "",
                config: SandboxConfig = DEFAULT) -> ExecResult:
    """Run `program`, then `setup` (test fixtures, which may use the program's names), then each of `tests`, in
    one namespace of a sandboxed interpreter.

    A test passes when it runs without an exception (an `assert` statement, or a `check(...)` call). The run
    passes when everything compiled, nothing raised, and the process reported back before the limits hit.
    """
    mode = isolation_mode(config.isolation)
    uid = allocate_uid()
    workdir = None if mode == "namespaces" else tempfile.mkdtemp(prefix="posttrain-sandbox-")
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    try:
        with tempfile.TemporaryFile() as spec_file, tempfile.TemporaryFile() as out, \
                tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as events:
            spec = {"program": program, "setup": setup, "tests": list(tests), "nonce": nonce,
                    "events_fd": events.fileno(), "workdir": workdir, "uid": uid, **_runner_settings(config)}
            spec_file.write(marshal.dumps(spec))
            spec_file.seek(0)
            flags = ["-I", "-B"] + ([] if config.site_packages else ["-S"])
            argv = [*command_prefix(mode), config.python or sys.executable, *flags, str(RUNNER)]
            try:
                proc = subprocess.Popen(argv, stdin=spec_file, stdout=out, stderr=err, env=ENV,
                                        cwd=workdir or "/", pass_fds=(events.fileno(),), start_new_session=True)
            except OSError as exc:
                return ExecResult("sandbox_error", 0, len(tests), error=f"could not start the sandbox: {exc}",
                                  isolation=mode)
            try:
                timed_out = _wait(proc, config.timeout_s)
            finally:  # also on KeyboardInterrupt: nothing outlives the call
                _reap(proc, mode, uid)
            duration = time.monotonic() - start
            return _result(_read_events(events, nonce), proc.returncode, timed_out, len(tests), config,
                           _head(out, config.output_bytes), _head(err, config.output_bytes), duration, mode)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _runner_settings(config: SandboxConfig) -> dict:
    """The limits part of the runner's spec (see _runner.py)."""
    return {"tmpfs_mb": 4 * config.file_size_mb, "block_sockets": config.block_sockets,
            "limits": {"cpu_s": config.cpu_limit_s, "memory_bytes": config.memory_mb << 20,
                       "max_processes": config.max_processes, "file_size_bytes": config.file_size_mb << 20}}


def run_mbpp(code: str, test_list: Sequence[str], test_setup_code: str = "",
             config: SandboxConfig = DEFAULT) -> ExecResult:
    """MBPP layout: the candidate `code`, then `test_setup_code` (in MBPP it builds inputs from the solution's
    classes, e.g. trees of `Node`), then each `assert` of `test_list` as one test."""
    return run_program(code, tests=test_list, setup=test_setup_code or "", config=config)


def run_humaneval(prompt: str, completion: str, test: str, entry_point: str,
                  config: SandboxConfig = DEFAULT) -> ExecResult:
    """HumanEval layout: the program is `prompt + completion`; the single test is `test` (which defines
    `check(candidate)`) followed by `check(entry_point)`."""
    return run_program(prompt + completion, tests=[f"{test}\n\ncheck({entry_point})\n"], config=config)


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to `timeout_s`; True when the run had to be killed. A pidfd wakes us the moment the process ends
    (Popen.wait(timeout) polls with sleeps of up to 50 ms, which would double the cost of a short run)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if poller.poll(timeout_s * 1000):
                proc.wait()
                return False
        else:
            proc.wait(timeout=timeout_s)
            return False
    except subprocess.TimeoutExpired:
        pass
    finally:
        if pidfd is not None:
            os.close(pidfd)
    _kill_group(proc.pid)
    proc.wait()
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(proc: subprocess.Popen, mode: str, uid: int | None) -> None:
    """Kill whatever the run left behind. With a PID namespace, killing the group (unshare and its PID 1) is
    enough: the kernel kills the rest of the namespace."""
    _kill_group(proc.pid)
    proc.wait()
    if mode != "namespaces" and uid is not None:
        kill_uid(uid)


def _head(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _read_events(f, nonce: str) -> list[dict]:
    """The runner's event lines: those that start with this run's nonce (anything else, written by the program
    to the inherited descriptor, is ignored), each a dict literal."""
    f.seek(0)
    prefix = f"{nonce}\t".encode()
    events = []
    for line in f.read(1 << 20).splitlines():
        if not line.startswith(prefix):
            continue
        try:
            event = ast.literal_eval(line[len(prefix):].decode("utf-8", errors="replace"))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _result(events: list[dict], returncode: int, timed_out: bool, n_tests: int, config: SandboxConfig,
            stdout: str, stderr: str, duration: float, mode: str) -> ExecResult:
    """Turn the runner's events and the exit status into an ExecResult."""
    exits = [e for e in events if e.get("event") == "exit"]
    tests = {e["index"]: e for e in events if e.get("event") == "test" and isinstance(e.get("index"), int)}
    passed = sum(1 for e in tests.values() if e.get("ok") is True)
    failures = [e for e in events if e.get("ok") is False]
    done = any(e.get("event") == "done" for e in events)
    details = {"returncode": returncode}
    child_code = None
    if exits:
        child_code = exits[-1].get("returncode")
        details.update(child_returncode=child_code, cpu_s=exits[-1].get("cpu_s"))

    def result(status: str, error: str) -> ExecResult:
        return ExecResult(status, passed, n_tests, error, stdout, stderr, duration, mode, details)

    if timed_out:
        return result("timeout", f"wall-clock timeout after {config.timeout_s:g} s")
    if failures:
        first = failures[0]
        where = f"test {first['index']}" if first.get("event") == "test" else first.get("event", "?")
        return result(first.get("kind", "runtime_error"), f"{where}: {first.get('error', '')}")
    if done and child_code == 0:
        return result("passed", "") if passed == n_tests else result("crash", "tests did not all report")
    if child_code is not None and child_code < 0:
        sig = -child_code
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and (details.get("cpu_s") or 0) >= config.cpu_limit_s):
            return result("timeout", f"CPU-time limit of {config.cpu_limit_s} s")
        if sig == signal.SIGXFSZ:
            return result("file_size", f"file-size limit of {config.file_size_mb} MB")
        return result("crash", f"killed by {signal.Signals(sig).name}")
    if not exits:
        started = any(e.get("event") == "start" for e in events)
        tail = (stderr.strip().splitlines() or [f"exit code {returncode}"])[-1]
        return result("crash" if started else "sandbox_error", f"the sandbox runner did not report: {tail}")
    return result("crash", f"exited with code {child_code} before finishing")
