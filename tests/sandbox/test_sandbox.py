"""The sandbox's ordinary behaviour: statuses, per-test counts, the MBPP and HumanEval layouts, output capture,
real MBPP reference solutions, the pool, and the same basics without namespaces."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from posttrain.sandbox import SandboxConfig, run_humaneval, run_many, run_mbpp, run_program
from posttrain.sandbox.execute import _read_events

MBPP = Path(__file__).resolve().parents[1] / "data" / "samples" / "mbpp" / "mbpp.jsonl"  # 182 real rows
FAST = SandboxConfig(timeout_s=5)


def mbpp_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]
    step = len(rows) // n
    return rows[::step][:n]  # spread over the file


def test_passing_program_with_tests():
    r = run_mbpp("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert (r.status, r.tests_passed, r.tests_total, r.passed, r.pass_fraction) == ("passed", 2, 2, True, 1.0)
    assert r.error == "" and r.duration_s < 5


def test_failing_test_is_counted_and_the_others_still_run():
    r = run_mbpp("def add(a, b):\n    return a - b\n",
                 ["assert add(1, 0) == 1", "assert add(1, 2) == 3", "assert add(2, 2) == 0"])
    assert r.status == "assertion_failed" and not r.passed
    assert (r.tests_passed, r.tests_total) == (2, 3)
    assert r.pass_fraction == pytest.approx(2 / 3)
    assert r.error.startswith("test 1: AssertionError")


@pytest.mark.parametrize("program, status, error", [
    ("def f(:\n    pass", "syntax_error", "program: SyntaxError"),
    ("def f():\n  return 1\n   return 2", "syntax_error", "program: IndentationError"),
    ("undefined_name + 1", "runtime_error", "program: NameError"),
    ("import sys\nsys.exit(0)", "runtime_error", "program: SystemExit"),
    ("import os\nos._exit(0)", "crash", "exited with code 0 before finishing"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "crash", "killed by SIGSEGV"),
    ("def f(): return f()\nf()", "runtime_error", "program: RecursionError"),
])
def test_failure_reasons(program, status, error):
    r = run_program(program, tests=["assert True"], config=FAST)
    assert r.status == status, r
    assert r.error.startswith(error), r.error
    assert r.tests_passed == 0 and not r.passed


def test_setup_code_runs_after_the_program_and_before_the_tests():
    # As in MBPP tasks 367 and 927: the setup builds test inputs from a class the solution defines.
    program = "class Node:\n    def __init__(self, v):\n        self.v = v\n\ndef value(n):\n    return n.v\n"
    r = run_mbpp(program, ["assert value(root) == 7"], test_setup_code="root = Node(7)")
    assert r.passed, r
    r = run_mbpp("def value(n):\n    return n.v\n", ["assert value(root) == 7"], test_setup_code="root = Node(7)")
    assert r.status == "runtime_error" and r.error.startswith("setup: NameError")


def test_humaneval_layout():
    prompt = 'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    good = run_humaneval(prompt, "    return a + b\n", test, "add")
    bad = run_humaneval(prompt, "    return a * b\n", test, "add")
    assert (good.status, good.tests_total) == ("passed", 1)
    assert bad.status == "assertion_failed" and bad.tests_passed == 0


def test_output_is_captured_and_capped():
    r = run_program("import sys\nprint('x' * 100000)\nprint('oops', file=sys.stderr)",
                    config=SandboxConfig(output_bytes=1000))
    assert r.passed
    assert r.stdout == "x" * 1000
    assert r.stderr == "oops\n"


def test_forged_events_without_the_nonce_are_ignored():
    # A program that writes "passed" lines to every inherited descriptor must not pass a failing test.
    forge = ("import os\nfor fd in range(3, 64):\n    try:\n"
             "        os.write(fd, b\"x\\t{'event': 'done'}\\n{'event': 'done'}\\n\")\n"
             "    except OSError:\n        pass\n")
    r = run_mbpp(forge, ["assert False"])
    assert r.status == "assertion_failed"


@pytest.mark.parametrize("hack", [
    "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n",
    "import builtins\nbuiltins.enumerate = lambda xs: iter(())\n",
])
def test_replacing_builtins_does_not_skip_the_tests(hack):
    assert not run_mbpp(hack, ["assert False"]).passed


def test_read_events_keeps_only_this_runs_lines(tmp_path):
    with open(tmp_path / "events", "w+b") as f:
        f.write(b"abc\t{'event': 'start'}\nzzz\t{'event': 'done'}\nabc\tnot a literal\nabc\t{'event': 'done'}\n")
        assert _read_events(f, "abc") == [{"event": "start"}, {"event": "done"}]


def test_the_program_runs_in_another_process_with_a_scrubbed_environment(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SANDBOX_SECRET", "hunter2")
    r = run_program("import os, sys\nprint(os.getpid())\nprint(sorted(os.environ))\nprint(sys.flags.isolated)")
    pid, env, isolated = r.stdout.splitlines()
    assert int(pid) != os.getpid()
    assert "POSTTRAIN_SANDBOX_SECRET" not in env and "hunter2" not in r.stdout
    assert isolated == "1"


def test_mbpp_reference_solutions_pass_and_wrong_ones_fail():
    rows = mbpp_rows(16)
    jobs = [functools.partial(run_mbpp, r["code"], r["test_list"], r["test_setup_code"], FAST) for r in rows]
    wrong = [functools.partial(run_mbpp, "def _unused():\n    return None\n", r["test_list"], r["test_setup_code"],
                               FAST) for r in rows]
    results = run_many(jobs + wrong, workers=2)
    good, bad = results[:len(rows)], results[len(rows):]
    assert [r.status for r in good] == ["passed"] * len(rows), [(r["task_id"], g.error) for r, g in zip(rows, good)
                                                               if not g.passed]
    assert not any(r.passed for r in bad)
    assert {r.status for r in bad} <= {"runtime_error", "assertion_failed"}


def test_run_many_keeps_order_and_validates_workers():
    jobs = [functools.partial(run_program, f"print({i})") for i in range(5)]
    assert [r.stdout for r in run_many(jobs, workers=3)] == [f"{i}\n" for i in range(5)]
    with pytest.raises(ValueError, match="workers"):
        run_many(jobs, workers=0)


def test_config_validation():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxConfig(memory_mb=0)
    assert SandboxConfig(timeout_s=2.5).cpu_limit_s == 4


def test_a_missing_interpreter_is_a_sandbox_error_not_a_program_failure():
    r = run_program("pass", config=SandboxConfig(python="/nonexistent/python"))
    assert r.status == "sandbox_error"


def test_without_namespaces_the_basics_hold(none_config, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SANDBOX_SECRET", "hunter2")
    assert run_mbpp("def f(x):\n    return x + 1\n", ["assert f(1) == 2"], config=none_config).passed
    assert run_mbpp("def f(x):\n    return x\n", ["assert f(1) == 2"], config=none_config).status == "assertion_failed"
    r = run_program("import os\nprint(os.environ.get('POSTTRAIN_SANDBOX_SECRET'))", config=none_config)
    assert (r.isolation, r.stdout) == ("none", "None\n")
