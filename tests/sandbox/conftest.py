"""Sandbox fixtures: the isolation this machine gives, and a working configuration without namespaces."""

from __future__ import annotations

import shutil
import sys

import pytest

from posttrain.sandbox import SandboxConfig, probe, run_program


@pytest.fixture(scope="session")
def isolation() -> str:
    """What `isolation="auto"` uses here: namespaces, userns or none."""
    return probe()[0]


@pytest.fixture(scope="session")
def none_config() -> SandboxConfig:
    """isolation="none" with an interpreter the sandbox user can read. As root, the run switches to an
    unprivileged user id; without a mount namespace to re-expose it, a Python installed under /root (mode 700)
    is unreadable to that user, so fall back to the system python3."""
    for python in (sys.executable, shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")):
        if python is None:
            continue
        cfg = SandboxConfig(isolation="none", timeout_s=5, python=python)
        if run_program("pass", config=cfg).status == "passed":
            return cfg
    pytest.skip("no interpreter works in the sandbox without namespaces on this machine")
