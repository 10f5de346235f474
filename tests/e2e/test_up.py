"""The README's first command: ``hivemesh up`` starts the whole mesh, runs
the coding -> test -> review workflow through the orchestrator and stops
every process."""

import os
import re
import signal
import subprocess
import sys

import pytest


def test_up_runs_the_workflow_through_the_mesh_and_stops_everything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hivemesh.cli.main", "up",
                             "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for service in ("artifact", "information", "llm", "memory", "orchestrator"):
        assert re.search(rf"{service}\s+listening on 127\.0\.0\.1:\d+", out)
    assert "workflow SUCCEEDED" in out
    tasks = re.findall(r"^  (code|test|review)\s+SUCCEEDED\s+by (\w+)\s+mock-small\s+(\d+) "
                       r"tokens\s+(\d+) micros\s+recalled (\d+)\s+artifact (art-[0-9a-f-]{36})",
                       out, re.MULTILINE)
    assert [(t[0], t[1]) for t in tasks] == [("code", "coder"), ("test", "tester"),
                                            ("review", "reviewer")]
    assert int(tasks[2][4]) > 0  # the reviewer recalled what the coder wrote back
    events = re.findall(r"^  #(\d+)\s+(\w+)", out, re.MULTILINE)
    assert [int(n) for n, _ in events] == list(range(1, len(events) + 1))
    assert events[0][1] == "WORKFLOW_START" and events[-1][1] == "WORKFLOW_COMPLETE"
    assert "--- code (coder) ---\ndef solve" in out  # the code came from the LLM service
    assert "replayed=True (same trace True)" in out
    listed = re.findall(r"(art-[0-9a-f-]{36})\s+(code|test|review)\s+by", out)
    assert sorted(a for a, _ in listed) == sorted(t[5] for t in tasks)
    status = re.search(r"budget status: spent (\d+) of 500 micro-USD .* reserved (\d+)", out)
    assert status and int(status.group(1)) == sum(int(t[3]) for t in tasks)
    assert status.group(2) == "0"
    assert re.search(r"trace id: [0-9a-f]{32}", out)
    assert out.rstrip().endswith("all services stopped")
    # The data stayed where it was asked to be.
    assert (tmp_path / "artifact" / "artifacts.sqlite3").exists()
    assert (tmp_path / "information" / "information.sqlite3").exists()
    assert any((tmp_path / "memory").iterdir())
    # The LLM service's and the orchestrator's request_id records, for
    # replays after a restart.
    assert (tmp_path / "llm" / "requests.sqlite3").exists()
    assert (tmp_path / "orchestrator" / "requests.sqlite3").exists()


def test_sigterm_stops_a_mesh_kept_running(tmp_path):
    status, rest, pids = _signalled(
        [sys.executable, "-m", "hivemesh.cli.main", "up", "--keep-running",
         "--data-dir", str(tmp_path)], "the mesh keeps running", signal.SIGTERM)
    assert status == 0
    assert rest.rstrip().endswith("all services stopped")
    assert not any(_alive(p) for p in pids)


def test_a_service_that_cannot_start_says_why_and_stops_the_others(tmp_path):
    """The services' logs live in a temporary directory that is gone once
    ``up`` exits: the reason a service did not start must reach the user."""
    import os

    env = {**os.environ, "HIVEMESH_MEMORY_STORE": "qdrant"}  # and no HIVEMESH_MEMORY_QDRANT_URL
    result = subprocess.run([sys.executable, "-m", "hivemesh.cli.main", "up",
                             "--data-dir", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "memory did not start" in result.stderr
    assert "QDRANT_URL" in result.stderr  # what the memory service said
    assert "Traceback" not in result.stderr
    assert result.stdout.rstrip().endswith("all services stopped")


# ``hivemesh up`` whose demonstration never ends: a signal is sure to
# interrupt it, after every service has started.
_UP_WITH_ENDLESS_DEMONSTRATION = """
import asyncio, sys
from hivemesh.cli import demo, main

async def endless(addresses):
    print("demonstrating", flush=True)
    await asyncio.Event().wait()

demo._demonstrate = endless
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_demonstration_stops_everything_and_exits_128_plus_it(
        tmp_path, signum, expected):
    """Interrupted before it is done, ``up`` exits as a shell expects of a
    command killed by the signal (128 + its number), after stopping every
    service."""
    status, rest, pids = _signalled(
        [sys.executable, "-c", _UP_WITH_ENDLESS_DEMONSTRATION, "up", "--data-dir", str(tmp_path)],
        "demonstrating", signum)
    assert status == expected
    assert f"{signal.Signals(signum).name}: stopping the mesh" in rest
    assert rest.rstrip().endswith("all services stopped")
    assert not any(_alive(p) for p in pids)


def _signalled(cmd: list[str], ready: str, signum: int) -> tuple[int, str, list[int]]:
    """Runs ``up`` (``cmd``) until a line starts with ``ready``, sends it
    ``signum``; returns its exit status, what it printed after the signal
    and the pids of the five services it had started."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(ready):
                break
        pids = [int(p) for p in re.findall(r"listening on \S+ \(pid (\d+)\)", "".join(lines))]
        assert len(pids) == 5
        proc.send_signal(signum)
        rest = proc.stdout.read()
        return proc.wait(timeout=60), rest, pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
