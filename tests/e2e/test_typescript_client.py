"""The TypeScript client (``clients/typescript``): it type-checks, and its
Node tests pass against the mesh, which they start as real ``hivemesh
serve`` processes on loopback ports chosen by the OS."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "typescript"
NODE_BIN = ROOT / "node_modules" / ".bin"
TESTS = ["test/errors.test.ts", "test/streams.test.ts", "test/mesh.test.ts", "test/tls.test.ts"]


def _node() -> str:
    """Node and the workspace's packages; skip without them, except in CI."""
    node = shutil.which("node")
    if node is None or not (NODE_BIN / "tsx").exists() or not (NODE_BIN / "tsc").exists():
        if os.environ.get("CI"):
            pytest.fail("node or node_modules is missing (make install runs npm ci)")
        pytest.skip("node or node_modules is missing; run make install")
    return node


def _run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    # Its own process group: on a timeout the whole group goes, including any
    # service process the Node tests started.
    proc = subprocess.Popen(cmd, cwd=CLIENT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout_s} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def test_typescript_client_type_checks():
    _node()
    result = _run([str(NODE_BIN / "tsc"), "--noEmit", "-p", "."], timeout_s=180)
    assert result.returncode == 0, result.stdout


def test_typescript_client_against_the_running_mesh():
    node = _node()
    env = {**os.environ, "HIVEMESH_PYTHON": sys.executable}
    result = _run([node, "--import", "tsx", "--test", *TESTS], timeout_s=300, env=env)
    out = result.stdout
    assert result.returncode == 0, out[-12000:]
    passed = re.search(r"^# pass (\d+)$", out, re.MULTILINE)
    # errors 6, streams 5, mesh 10, tls 11: a file that ran none of its tests shows here
    assert passed and int(passed.group(1)) >= 32, out[-4000:]
    # A skipped test leaves the exit status 0: none may be.
    for counter in ("fail", "cancelled", "skipped", "todo"):
        assert re.search(rf"^# {counter} 0$", out, re.MULTILINE), out[-4000:]
