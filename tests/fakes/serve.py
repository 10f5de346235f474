"""``hivemesh serve`` run as a process that must stop by itself: refused
settings (exit 2) or a failed start (exit 1)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def serve_refused(service: str, *args: str, env: dict[str, str] | None = None, cwd=None,
                  timeout_s: float = 60) -> subprocess.CompletedProcess:
    """``hivemesh serve <service> <args>`` (``env`` added to this process's
    environment); the test fails if it serves instead (run() kills it at
    the timeout)."""
    try:
        return subprocess.run([sys.executable, "-m", "hivemesh.cli.main", "serve", service,
                               *args], env={**os.environ, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{service} served instead of stopping: {exc.stdout!r}")
