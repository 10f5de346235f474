"""Redis on loopback, started from the installed ``redis-server``: a cluster
of three masters for the tests that run the shared-Redis scenarios on a
cluster too (the ``redis_cluster`` fixture of conftest.py), the same in
mutual TLS only, and a single Redis in mutual TLS (:class:`RedisTls`), and
three masters with a replica each for the tests that move a backend's slot
to another master and fail its master over (:class:`Cluster`)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RedisTls:
    """Mutual TLS for test nodes: the CA, each node's certificate and key
    (for server and client auth: a node is a client on the cluster bus), and
    a client's certificate and key (redis-cli's, and the one the URL names)."""

    ca: Path
    node_cert: Path
    node_key: Path
    client_cert: Path
    client_key: Path

    def node_options(self, port: int) -> list[str]:
        """A node listening on ``port`` in TLS only, requiring a client
        certificate from the CA, TLS on its cluster bus and replication too."""
        return ["--port", "0", "--tls-port", str(port),
                "--tls-cert-file", str(self.node_cert), "--tls-key-file", str(self.node_key),
                "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes",
                "--tls-cluster", "yes", "--tls-replication", "yes"]

    def cli_options(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca), "--cert", str(self.client_cert),
                "--key", str(self.client_key)]

    def url(self, port: int) -> str:
        """A ``rediss://`` URL with the files as redis-py reads them from its
        query."""
        return (f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={self.ca}"
                f"&ssl_certfile={self.client_cert}&ssl_keyfile={self.client_key}")


def _url(port: int, tls: RedisTls | None) -> str:
    return tls.url(port) if tls is not None else f"redis://127.0.0.1:{port}/0"


def _cli(cli: str, port: int, *args: str, tls: RedisTls | None = None) -> str:
    done = subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port),
                           *(tls.cli_options() if tls is not None else ()), *args],
                          capture_output=True, text=True, timeout=30)
    return done.stdout


def _wait_until(what: str, check) -> None:
    for _ in range(TRIES):
        if check():
            return
        time.sleep(STEP_S)
    raise RuntimeError(f"the test Redis Cluster: {what} did not happen in time")


def _start_node(server: str, port: int, folder: Path, *options: str,
                tls: RedisTls | None = None, cluster: bool = True) -> subprocess.Popen:
    folder.mkdir()
    listen = tls.node_options(port) if tls is not None else ["--port", str(port)]
    clustered = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    return subprocess.Popen(
        [server, *listen, "--bind", "127.0.0.1", "--dir", str(folder),
         *(clustered if cluster else ()),
         "--save", "", "--appendonly", "no", "--logfile", "redis.log", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Cluster:
    """The nodes of a running test cluster, and what a test does to them:
    which master serves a key, moving a key's slot to another master,
    waiting until the replicas have every write, killing a node."""

    def __init__(self, cli: str, ports: list[int], processes: dict[int, subprocess.Popen]):
        self.cli = cli
        self.ports = ports
        self.processes = processes

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.live()[0]}/0"

    def live(self) -> list[int]:
        return [p for p in self.ports if self.processes[p].poll() is None]

    def _client(self, port: int):
        import redis
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)

    def _masters(self) -> dict[str, tuple[int, list[tuple[int, int]]]]:
        """node id -> (port, slot ranges) of the masters that are not failing,
        as a live node sees them."""
        masters = {}
        for line in _cli(self.cli, self.live()[0], "cluster", "nodes").splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            if "master" not in flags or "fail" in flags or "fail?" in flags:
                continue
            port = int(fields[1].split("@")[0].rpartition(":")[2])
            ranges = []
            for item in fields[8:]:
                if item.startswith("["):  # a slot being migrated or imported
                    continue
                first, _, last = item.partition("-")
                ranges.append((int(first), int(last or first)))
            masters[fields[0]] = (port, ranges)
        return masters

    def master_of(self, slot: int) -> tuple[str, int]:
        """(node id, port) of the master serving ``slot``."""
        for node_id, (port, ranges) in self._masters().items():
            if any(first <= slot <= last for first, last in ranges):
                return node_id, port
        raise RuntimeError(f"no master serves slot {slot}")

    def move_slot(self, slot: int) -> int:
        """Moves ``slot`` and its keys to another master, the way
        ``redis-cli --cluster reshard`` does (IMPORTING, MIGRATING, MIGRATE,
        then NODE on every master); returns the port of its new master."""
        source_id, source = self.master_of(slot)
        masters = self._masters()
        target_id, (target, _) = next((i, m) for i, m in masters.items() if i != source_id)
        with self._client(source) as src, self._client(target) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for port, _ in masters.values():
            with self._client(port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return target

    def wait_replicated(self, port: int) -> None:
        """Until the replicas of the master at ``port`` have all its writes
        (replication is asynchronous: a master killed earlier could take
        acknowledged writes with it)."""
        def replicated() -> bool:
            with self._client(port) as client:
                info = client.info("replication")
            offsets = [v["offset"] for k, v in info.items() if k.startswith("slave")
                       and isinstance(v, dict)]
            return bool(offsets) and all(o == info["master_repl_offset"] for o in offsets)
        _wait_until(f"the replicas of {port} catching up", replicated)

    def kill(self, port: int) -> None:
        self.processes[port].kill()
        self.processes[port].wait()


def _answering(cli: str, ports: list[int], tls: RedisTls | None) -> None:
    for port in ports:
        _wait_until(f"node {port} answering",
                    lambda p=port: _cli(cli, p, "ping", tls=tls) == "PONG\n")


def _create(cli: str, ports: list[int], replicas: int, tls: RedisTls | None = None) -> None:
    _answering(cli, ports, tls)
    subprocess.run([cli, *(tls.cli_options() if tls is not None else ()),
                    "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                    "--cluster-replicas", str(replicas), "--cluster-yes"],
                   capture_output=True, check=True, timeout=60)
    for port in ports:
        _wait_until(f"node {port} seeing the cluster ok",
                    lambda p=port: "cluster_state:ok" in _cli(cli, p, "cluster", "info", tls=tls))
    if replicas:
        def linked(port: int) -> bool:
            info = _cli(cli, port, "info", "replication")
            return "role:master" in info or "master_link_status:up" in info
        for port in ports:
            _wait_until(f"node {port} replicating", lambda p=port: linked(p))


@contextlib.contextmanager
def cluster_with_replicas(folder: Path, server: str, cli: str) -> Iterator[Cluster]:
    """Three masters with a replica each; a replica takes over a master
    its peers have not heard from for a second (``cluster-node-timeout``).
    Stops every node at the end."""
    ports = free_ports(2 * MASTERS)
    processes: dict[int, subprocess.Popen] = {}
    try:
        for port in ports:
            processes[port] = _start_node(server, port, folder / str(port),
                                          "--cluster-node-timeout", "1000")
        _create(cli, ports, replicas=1)
        yield Cluster(cli, ports, processes)
    finally:
        for process in processes.values():
            _stop(process)


@contextlib.contextmanager
def redis_cluster(folder: Path, server: str, cli: str,
                  tls: RedisTls | None = None) -> Iterator[str]:
    """Starts the nodes in ``folder``, joins them in a cluster (no
    replicas), waits until every node says the cluster is ok and yields the
    URL of its first node; stops every node at the end. With ``tls`` the
    nodes speak mutual TLS only."""
    ports = free_ports(MASTERS)
    processes: list[subprocess.Popen] = []
    try:
        for port in ports:
            processes.append(_start_node(server, port, folder / str(port), tls=tls))
        _create(cli, ports, replicas=0, tls=tls)
        yield _url(ports[0], tls)
    finally:
        for process in processes:
            _stop(process)


@contextlib.contextmanager
def single_redis(folder: Path, server: str, cli: str, tls: RedisTls) -> Iterator[str]:
    """One Redis (not a cluster) speaking mutual TLS only; yields its URL."""
    (port,) = free_ports(1)
    process = _start_node(server, port, folder / str(port), tls=tls, cluster=False)
    try:
        _answering(cli, [port], tls)
        yield _url(port, tls)
    finally:
        _stop(process)
