"""The sandbox's inside half: a standalone script run as `python -I -S _runner.py` in a fresh interpreter.

It is never imported by the trainer, and imports only the standard library (with `-S` nothing else is on the
path), and little of it: start-up time is most of an execution's cost (json alone would add ~10 ms through re).
The parent (posttrain/sandbox/execute.py) writes a `marshal`-encoded spec to its stdin:

    program, setup, tests   source strings; program, then setup, then each test run in one namespace
    nonce                   random string that starts each line this runner writes to the events file
    events_fd               inherited file descriptor for those lines: `nonce<TAB>repr(dict of plain values)`
    workdir                 working directory made by the parent, or null: make one on a fresh tmpfs
    tmpfs_mb                size of each tmpfs mounted over the world-writable directories (workdir null)
    uid                     unprivileged user id to switch to (when started as root), or null
    limits                  {cpu_s, memory_bytes, max_processes, file_size_bytes}
    block_sockets           refuse Python-level AF_INET/AF_INET6 sockets through an audit hook

Process layout: this process (the *reaper*) prepares the working directory while it still has privileges, then
forks the *harness*, which applies the resource limits, drops to `uid`, and runs the untrusted code. The reaper
waits for it and writes the final `exit` event (exit code or signal, CPU seconds) that the untrusted code cannot
forge, as it can neither signal nor trace the reaper. Inside a PID namespace the reaper is PID 1, so when it
exits the kernel kills every process the code left behind.
"""

import builtins
import errno
import marshal
import os
import resource
import sys

_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_MOVE, _MS_REC = 2, 4, 4096, 8192, 16384
_PR_SET_NO_NEW_PRIVS = 38
_AF_INET, _AF_INET6 = 2, 10
_exec, _compile = builtins.exec, builtins.compile  # the program may replace the builtins; the tests still run


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source: str, target: str, flags: int, options: str | None = None, fstype: str | None = None):
    import ctypes
    opts = options.encode() if options is not None else None
    kind = fstype.encode() if fstype is not None else None
    if libc.mount(source.encode(), target.encode(), kind, flags, opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def prepare_workdir(spec: dict, libc) -> str:
    """The working directory: the parent's, or (in a mount namespace) a new one on a fresh tmpfs."""
    workdir = spec["workdir"]
    if workdir is None:
        for target in _WORLD_WRITABLE:  # files written there vanish with the mount namespace
            if os.path.isdir(target):
                _mount(libc, "tmpfs", target, _MS_NOSUID | _MS_NODEV, f"size={spec['tmpfs_mb']}m,mode=1777", "tmpfs")
        if spec["uid"] is not None:
            expose_import_dirs(libc)
        workdir = "/tmp/work"
        os.mkdir(workdir, 0o700)
    elif spec["uid"] is not None:
        check_import_dirs()
    if spec["uid"] is not None:
        os.chown(workdir, spec["uid"], spec["uid"])
    return workdir


def set_limits(limits: dict) -> None:
    """RLIMIT_CPU (soft; SIGKILL one second later), AS, NPROC, FSIZE, and no core dumps."""
    cpu = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def blocked_ancestor(path: str) -> str | None:
    """The top-most directory at or above `path` that other users cannot pass through (or list, for `path`)."""
    path = os.path.abspath(path)
    parts = path.split("/")[1:]
    for i in range(1, len(parts) + 1):
        prefix = "/" + "/".join(parts[:i])
        need = 0o005 if prefix == path else 0o001
        if os.stat(prefix).st_mode & need != need:
            return prefix
    return None


def import_dirs() -> list[str]:
    """The interpreter's directory and the existing directories on sys.path, none inside another."""
    paths = [os.path.dirname(os.path.realpath(sys.executable)), *sys.path]
    dirs = sorted({os.path.abspath(p) for p in paths if p and os.path.isdir(p)})
    return [d for d in dirs if not any(d.startswith(o + "/") for o in dirs if o != d)]


def expose_import_dirs(libc) -> None:
    """Make the interpreter's own library reachable for the unprivileged user when it sits under a directory
    others cannot enter (a Python installed under /root, mode 700). In the private mount namespace, each such
    directory is bind-mounted aside, an empty tmpfs (mode 755) covers its blocked ancestor, and the bind moves back
    to its old path: the library stays where sys.path and every module's __path__ expect it, the rest of the
    ancestor stays hidden."""
    blocked: dict[str, list[str]] = {}
    for d in import_dirs():
        ancestor = blocked_ancestor(d)
        if ancestor is not None:
            blocked.setdefault(ancestor, []).append(d)
    for k, (ancestor, dirs) in enumerate(blocked.items()):
        staged = []
        for j, d in enumerate(dirs):
            stage = f"/tmp/.stage-{k}-{j}"
            os.mkdir(stage)
            _mount(libc, d, stage, _MS_BIND | _MS_REC)
            staged.append((stage, d))
        _mount(libc, "tmpfs", ancestor, _MS_NOSUID | _MS_NODEV, "size=1m,mode=755", "tmpfs")
        for stage, d in staged:
            os.makedirs(d, exist_ok=True)
            _mount(libc, stage, d, _MS_MOVE)
            os.rmdir(stage)


def check_import_dirs() -> None:
    """Without a mount namespace nothing can be re-exposed: refuse to run rather than keep root."""
    for d in import_dirs():
        ancestor = blocked_ancestor(d)
        if ancestor is not None:
            raise RuntimeError(f"the sandbox interpreter's library {d} is not readable by an unprivileged user "
                               f"({ancestor} is closed); use namespace isolation or set SandboxConfig.python "
                               f"to a world-readable interpreter such as /usr/bin/python3")


def drop_privileges(uid, libc) -> None:
    """No new privileges through set-uid binaries; then, when started as root, become `uid` for good."""
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)


def block_inet_sockets() -> None:
    """Refuse Python-level internet sockets. A fallback for when no network namespace is available; code that
    reaches the C library directly (ctypes, a child process) is not stopped by it."""

    def hook(event, args):
        if event == "socket.__new__" and len(args) > 1 and args[1] in (_AF_INET, _AF_INET6, -1):
            raise PermissionError(errno.EACCES, "network access is disabled in the sandbox")

    sys.addaudithook(hook)


def classify(exc: BaseException) -> str:
    """The failure kind of an exception raised by setup, program or test code."""
    if isinstance(exc, SyntaxError):
        return "syntax_error"
    if isinstance(exc, AssertionError):
        return "assertion_failed"
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "file_size"
    return "runtime_error"


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())[:300]


def confine(spec: dict, workdir: str, libc) -> None:
    """In the forked child, before any untrusted code: working directory, limits, privileges, socket hook."""
    os.chdir(workdir)
    os.environ.update(HOME=workdir, TMPDIR=workdir)
    set_limits(spec["limits"])
    drop_privileges(spec["uid"], libc)
    if spec["block_sockets"]:
        block_inet_sockets()


def run_code(spec: dict, emit) -> None:
    """Program, then setup, then each test, in one namespace; an event for each failure and each test."""
    emit(event="start")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    stages = [("program", spec["program"]), ("setup", spec["setup"])]  # MBPP's setup code uses the program's names
    for name, source in stages:
        try:
            _exec(_compile(source, f"<{name}>", "exec"), namespace)
        except BaseException as exc:  # noqa: BLE001 - untrusted code may raise anything, SystemExit included
            emit(event=name, ok=False, kind=classify(exc), error=describe(exc))
            return
    for i, test in enumerate(spec["tests"]):
        try:
            _exec(_compile(test, f"<test {i}>", "exec"), namespace)
            emit(event="test", index=i, ok=True)
        except BaseException as exc:  # noqa: BLE001
            emit(event="test", index=i, ok=False, kind=classify(exc), error=describe(exc))
    emit(event="done")


def harness(spec: dict, workdir: str, emit, libc) -> int:
    """The forked child's work; returns its exit code."""
    try:
        confine(spec, workdir, libc)
    except Exception as exc:  # noqa: BLE001 - the sandbox's fault: nothing untrusted has run yet
        emit(event="sandbox", ok=False, kind="sandbox_error", error=describe(exc))
        return 1
    try:
        run_code(spec, emit)
    except BaseException:  # noqa: BLE001 - e.g. the program closed the events file: no report, a crash
        return 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001 - e.g. a full stdout file
            pass
    return 0


def main() -> None:
    spec = marshal.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    events = os.fdopen(spec["events_fd"], "a", buffering=1)
    nonce = spec["nonce"]

    def emit(**fields):
        events.write(f"{nonce}\t{fields!r}\n")
        events.flush()

    libc = _libc()
    try:
        workdir = prepare_workdir(spec, libc)
    except Exception as exc:  # noqa: BLE001 - reported as the sandbox's fault, not the program's
        emit(event="sandbox", ok=False, kind="sandbox_error", error=describe(exc))
        sys.exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = harness(spec, workdir, emit, libc)
        finally:
            os._exit(code)  # never return into the reaper's code, whatever happened
    _, status, usage = os.wait4(pid, 0)
    emit(event="exit", returncode=os.waitstatus_to_exitcode(status), cpu_s=usage.ru_utime + usage.ru_stime)


if __name__ == "__main__":
    main()
