"""A Redis Cluster of three masters on loopback, started from the installed
``redis-server`` for the tests that run the shared-Redis scenarios on a
cluster too (the ``redis_cluster`` fixture of conftest.py)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

MASTERS = 3
# A node's cluster bus listens on its port + 10000.
BUS_OFFSET = 10_000
# Bounded waits: tries of a check, STEP_S apart.
TRIES = 300
STEP_S = 0.1


def cluster_tools() -> tuple[str, str] | None:
    """(redis-server, redis-cli), or None when either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` ports free on loopback (bound to port 0 and released), each
    with its cluster bus port free too."""
    ports: list[int] = []
    for _ in range(TRIES):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + BUS_OFFSET <= 65535 and port not in ports and _port_free(port + BUS_OFFSET):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"found only {len(ports)} of {n} free ports for a Redis Cluster")


def _cli(cli: str, port: int, *args: str) -> str:
    done = subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=30)
    return done.stdout


def _wait_until(what: str, check) -> None:
    for _ in range(TRIES):
        if check():
            return
        time.sleep(STEP_S)
    raise RuntimeError(f"the test Redis Cluster: {what} did not happen in time")


def _start_node(server: str, port: int, folder: Path) -> subprocess.Popen:
    folder.mkdir()
    return subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
         "--save", "", "--appendonly", "no", "--logfile", "redis.log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def redis_cluster(folder: Path, server: str, cli: str) -> Iterator[str]:
    """Starts the nodes in ``folder``, joins them in a cluster (no
    replicas), waits until every node says the cluster is ok and yields the
    URL of its first node; stops every node at the end."""
    ports = free_ports(MASTERS)
    processes: list[subprocess.Popen] = []
    try:
        for port in ports:
            processes.append(_start_node(server, port, folder / str(port)))
        for port in ports:
            _wait_until(f"node {port} answering", lambda p=port: _cli(cli, p, "ping") == "PONG\n")
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       capture_output=True, check=True, timeout=60)
        for port in ports:
            _wait_until(f"node {port} seeing the cluster ok",
                        lambda p=port: "cluster_state:ok" in _cli(cli, p, "cluster", "info"))
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for process in processes:
            _stop(process)
