"""Sandbox settings (limits and isolation) and the structured result of one execution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Status = Literal["passed", "assertion_failed", "runtime_error", "syntax_error", "timeout", "memory", "file_size",
                 "crash", "sandbox_error"]
"""Why an execution ended:

    passed            setup, program and every test ran without an exception
    assertion_failed  a test (or the program) raised AssertionError
    runtime_error     any other exception, SystemExit included (a program that exits early has not passed)
    syntax_error      setup, program or a test does not compile
    timeout           the wall-clock limit, or the CPU-time limit (SIGXCPU / SIGKILL at the hard limit)
    memory            MemoryError under the address-space limit
    file_size         a write past the file-size limit (EFBIG), also for stdout/stderr flooding
    crash             the process died without reporting: a signal, os._exit, a killed interpreter
    sandbox_error     the sandbox itself could not run the program (not the program's fault)
"""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation for one execution. Every limit applies to the candidate program and its children."""

    timeout_s: float = 5.0  # wall clock from process start to kill, interpreter start-up included
    cpu_s: int | None = None  # RLIMIT_CPU soft limit in seconds; None: ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS (address space), per process
    max_processes: int = 16  # RLIMIT_NPROC: processes + threads of the sandbox's user id (see docs/rewards.md)
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write; stdout/stderr files included
    output_bytes: int = 8192  # stdout / stderr kept in the result (the rest is discarded)
    isolation: Literal["auto", "none"] = "auto"  # auto: namespaces when the kernel allows; none: limits only
    block_sockets: bool = True  # also refuse Python-level internet sockets (an audit hook), namespaces or not
    site_packages: bool = False  # let the program import the interpreter's installed packages (else python -S)
    python: str | None = None  # interpreter for the program; None: the trainer's own (sys.executable)

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError(f"sandbox timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "max_processes", "file_size_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"sandbox {name} must be >= 1, got {getattr(self, name)}")

    @property
    def cpu_limit_s(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(self.timeout_s + 0.999) + 1


@dataclass(frozen=True)
class ExecResult:
    """What one sandboxed execution did."""

    status: Status
    tests_passed: int  # tests that ran without an exception
    tests_total: int
    error: str = ""  # one line: the first failure, e.g. "test 1: AssertionError" or "timeout after 2.0 s"
    stdout: str = ""  # first `output_bytes` bytes, decoded leniently
    stderr: str = ""
    duration_s: float = 0.0  # wall clock, start-up and clean-up included
    isolation: str = ""  # the isolation actually used: "namespaces", "userns" or "none"
    details: dict = field(default_factory=dict, compare=False)  # exit code, CPU seconds, ...

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def pass_fraction(self) -> float:
        """Fraction of tests passed; for a run without tests, 1.0 if it passed else 0.0."""
        if self.tests_total == 0:
            return float(self.passed)
        return self.tests_passed / self.tests_total
