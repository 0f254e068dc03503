"""Which isolation this machine allows, the command prefix that sets it up, and per-run user ids.

Three modes, best first; `isolation_mode("auto")` probes once per process and picks the best that works:

    namespaces  started as root: `unshare` gives the run its own mount, network and PID namespaces (and /proc);
                the runner mounts fresh tmpfs over the world-writable directories, works in one of them,
                re-exposes the interpreter's library if it sits under a closed directory (/root), and switches
                to a user id of its own, so RLIMIT_NPROC counts only this run's processes
    userns      not root, but unprivileged user namespaces work: own user, network and PID namespaces;
                RLIMIT_NPROC counts per user namespace (Linux >= 5.14); the filesystem is the user's own
    none        resource limits only, in a new session; the network is refused through an audit hook
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import subprocess
import threading

log = logging.getLogger(__name__)

_ROOT_FLAGS = ["--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
_USER_FLAGS = ["--user", "--net", "--pid", "--fork", "--kill-child"]
_uid_lock = threading.Lock()
_uid_counter = itertools.count()
_warned = threading.Event()


def _is_root() -> bool:
    return os.geteuid() == 0


@functools.lru_cache(maxsize=None)
def probe() -> tuple[str, str]:
    """(mode, reason): the best isolation available here, found by running `unshare ... true` once."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "none", "the unshare command is not installed"
    mode, flags = ("namespaces", _ROOT_FLAGS) if _is_root() else ("userns", _USER_FLAGS)
    try:
        done = subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "none", f"unshare failed: {exc}"
    if done.returncode != 0:
        return "none", f"unshare {' '.join(flags)} failed: {done.stderr.decode(errors='replace').strip()}"
    return mode, f"unshare {' '.join(flags)} works"


def isolation_mode(requested: str) -> str:
    """The mode to use for `requested` ("auto" or "none"); warns once when auto falls back to "none"."""
    if requested == "none":
        return "none"
    mode, reason = probe()
    if mode == "none" and not _warned.is_set():
        _warned.set()
        log.warning("sandbox: no namespace isolation (%s); running with resource limits only", reason)
    return mode


def command_prefix(mode: str) -> list[str]:
    """The argv that goes before `python runner.py` for `mode`."""
    if mode == "none":
        return []
    return [shutil.which("unshare") or "unshare", *(_ROOT_FLAGS if mode == "namespaces" else _USER_FLAGS)]


def allocate_uid() -> int | None:
    """A user id no other concurrent run of this process uses (root only; None otherwise). Owning no files and
    shared with no one, it makes RLIMIT_NPROC a per-run limit and lets `kill_uid` find every leftover."""
    if not _is_root():
        return None
    with _uid_lock:
        n = next(_uid_counter)
    return 1_500_000_000 + (os.getpid() % 100_000) * 1000 + n % 1000


def kill_uid(uid: int) -> None:
    """SIGKILL every process running as `uid` (kill(-1) from a process with that uid), e.g. a background process
    that left the run's session. Only needed without a PID namespace."""
    subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[], capture_output=True,
                   env={"PATH": "/usr/bin:/bin"}, timeout=10)
