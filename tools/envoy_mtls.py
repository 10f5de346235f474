"""Generate and check the mutual-TLS variant of the Envoy sidecar config.

    python tools/envoy_mtls.py generate   # rewrite the files below
    python tools/envoy_mtls.py check      # fail if a committed one is stale
    python tools/envoy_mtls.py clients NAME...   # print a clients file naming them

The files: deploy/envoy/sidecar-mtls.yaml and the three SDS resource
files it reads its certificate and CAs from, deploy/envoy/mesh-tls-*.sds.yaml.

Envoy cannot turn TLS on from the environment, and a config that needs
certificates leaves its TLS listener and clusters unusable where there are
none, so the mTLS sidecar is a config file of its own. It is deploy/envoy/sidecar.yaml (comments and
all) with these additions, and nothing else changed:

* the inbound listener (0.0.0.0:10000) terminates TLS and requires a client
  certificate that chains to the mesh CA, and, when the clients file names
  some (``clients``), carries one of those names;
* each egress cluster toward provider pods (artifact, information, llm,
  memory) speaks TLS to the pod's sidecar, presents this pod's certificate,
  sends SNI ``hivemesh-<provider>-pods`` and accepts only a server
  certificate from the mesh CA with that name as a DNS subject alt name;
* a node id and cluster (NODE), which SDS requires;
* a readiness check of the TLS side: a listener on a socket of the pod
  alone (an abstract Unix socket, READY_SOCKET) with the inbound
  listener's certificate and clients file, a cluster that completes a TLS
  handshake with it against the mesh CA, and that cluster required healthy
  by the readiness listener (:9902/ready). Envoy lets its start-up finish
  when an SDS file is broken (the secret is then simply not there), so a
  sidecar started on a broken certificate, CA or clients file would pass
  its readiness probe while its inbound listener refuses every client;
  with the check it stays unready until a good file comes. A broken file
  pushed to a running sidecar is refused and the secret it had kept, so
  the check keeps passing.

The local cluster (the service on loopback), the admin and readiness
listeners and the collector cluster stay plaintext. Certificates are read
from the Secret mounted by deploy/k8s/components/mesh-mtls (CERT_DIR).

The TLS contexts do not name the certificate files: they take the
certificate and the CA from file-based SDS (secret discovery), one
resource file each, shipped in the sidecar ConfigMap beside the config
(CONFIG_DIR). The inbound listener takes the CA from a file of its own,
the clients file (mesh-tls-clients.sds.yaml): the same CA, plus the names
a client certificate must carry one of. The generated one names none (any
certificate from the mesh CA, as the egress clusters' CA file); an overlay
replaces it with one ``clients`` prints, for every Deployment or, as the
clients file is mounted alone in a volume of its own (CLIENTS_DIR), for
some Deployments only. Each Secret resource names the files and watches CERT_DIR,
so when the kubelet swaps the Secret's ..data symlink for a renewed
certificate Envoy reads the files again and new connections use them,
without a restart. Each SDS file is watched the same way, through the
directory it is mounted in: an updated ConfigMap volume (a new clients
file) is read again without a restart too.

The additions are made as text, so the generated file keeps the source's
comments and anchors; the result is then parsed and compared with the same
additions made on the parsed source, so a text edit that went wrong fails
here rather than in Envoy.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "deploy" / "envoy" / "sidecar.yaml"
TARGET = ROOT / "deploy" / "envoy" / "sidecar-mtls.yaml"
CERT_DIR = "/etc/hivemesh/mesh-tls"
# Where the sidecar ConfigMap is mounted in the Envoy container.
CONFIG_DIR = "/etc/envoy"
# Where the clients file alone is mounted from it, a volume of its own, so
# that each Deployment may choose which ConfigMap key it is (README, Deploy).
CLIENTS_DIR = "/etc/hivemesh/mesh-clients"
# The SDS secrets: name -> the resource file (beside TARGET, in the ConfigMap).
CERTIFICATE_SECRET = "mesh_certificate"
CA_SECRET = "mesh_ca"
# The inbound listener's CA, with the names its clients must carry one of.
CLIENTS_SECRET = "mesh_clients"
SDS_FILES = {CERTIFICATE_SECRET: "mesh-tls-certificate.sds.yaml",
             CA_SECRET: "mesh-tls-ca.sds.yaml",
             CLIENTS_SECRET: "mesh-tls-clients.sds.yaml"}
# The directory each SDS file is mounted in.
SDS_DIRS = {CERTIFICATE_SECRET: CONFIG_DIR, CA_SECRET: CONFIG_DIR, CLIENTS_SECRET: CLIENTS_DIR}
PROVIDERS = ("artifact", "information", "llm", "memory")
# The node Envoy identifies itself as; required by SDS, the same in every pod.
NODE = {"id": "hivemesh-sidecar", "cluster": "hivemesh"}
# The readiness check of the TLS side: the listener and the cluster that
# checks it, on an abstract Unix socket (pod-local, no file, no port).
READY_CHECK = "mesh_tls_ready"
READY_SOCKET = "@hivemesh-mesh-tls-ready"

HEADER = f"""\
# Generated by tools/envoy_mtls.py from sidecar.yaml. DO NOT EDIT.
#
# The sidecar with mutual TLS between pods (the mesh-mtls component): as
# sidecar.yaml, plus TLS on the inbound listener (a client certificate from
# the mesh CA required) and on the egress clusters toward provider pods
# (this pod's certificate presented; the server's checked against the mesh
# CA and the name hivemesh-<provider>-pods). Certificates from the Secret
# mounted at {CERT_DIR} (ca.crt, tls.crt, tls.key)
# through file-based SDS ({CONFIG_DIR}/mesh-tls-*.sds.yaml): a renewed
# certificate is taken without a restart. The names a client certificate
# must carry one of, if any, are in the clients file, alone in a volume
# of its own ({CLIENTS_DIR}), read again when it is updated.
# /ready on :9902 also waits for the TLS side (the {READY_CHECK} cluster):
# a sidecar started on a broken certificate, CA or clients file is not ready.
#
"""

_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."


_SECRET = _TLS + "Secret"


def subject_alt_name_matchers(names: Sequence[str]) -> list[dict]:
    """Envoy's exact matchers of ``names``: a name with ``://`` (a SPIFFE
    id) is a URI subject alt name, any other a DNS one."""
    return [{"san_type": "URI" if "://" in name else "DNS", "matcher": {"exact": name}}
            for name in names]


def _mesh_ca(secret: str, client_names: Sequence[str] = ()) -> dict:
    context: dict = {"trusted_ca": {"filename": f"{CERT_DIR}/ca.crt"}}
    if client_names:
        context["match_typed_subject_alt_names"] = subject_alt_name_matchers(client_names)
    context["watched_directory"] = {"path": CERT_DIR}
    return {"resources": [{"@type": _SECRET, "name": secret, "validation_context": context}]}


def sds_resources(client_names: Sequence[str] = ()) -> dict[str, dict]:
    """Each SDS file's content: a DiscoveryResponse with one Secret; the
    clients file's requiring one of ``client_names`` (none: any client
    certificate from the mesh CA). The files are read through CERT_DIR's
    ..data symlink; watching the directory makes the kubelet's atomic swap
    of it a reload, and the certificate and key are read together."""
    return {
        CERTIFICATE_SECRET: {"resources": [{
            "@type": _SECRET, "name": CERTIFICATE_SECRET,
            "tls_certificate": {
                "certificate_chain": {"filename": f"{CERT_DIR}/tls.crt"},
                "private_key": {"filename": f"{CERT_DIR}/tls.key"},
                "watched_directory": {"path": CERT_DIR}}}]},
        CA_SECRET: _mesh_ca(CA_SECRET),
        CLIENTS_SECRET: _mesh_ca(CLIENTS_SECRET, client_names),
    }


def sds_path(secret: str) -> str:
    """Where the sidecar reads ``secret``'s SDS file."""
    return f"{SDS_DIRS[secret]}/{SDS_FILES[secret]}"


def _sds(secret: str) -> dict:
    """The SDS source of ``secret``: its file, read again when the kubelet
    swaps the ..data symlink of the volume it is in (a watched directory;
    watching the file alone misses that swap)."""
    return {"name": secret, "sds_config": {
        "path_config_source": {"path": sds_path(secret),
                               "watched_directory": {"path": SDS_DIRS[secret]}},
        "resource_api_version": "V3"}}


def _sds_source_text(secret: str, indent: str) -> str:
    """_sds(secret)'s path_config_source, its keys indented by ``indent``."""
    return (f"\n{indent}path: {sds_path(secret)}"
            f"\n{indent}watched_directory: {{path: {SDS_DIRS[secret]}}}")


def _certificate() -> list[dict]:
    return [_sds(CERTIFICATE_SECRET)]


def server_name(provider: str) -> str:
    """SNI sent to, and DNS SAN required of, a provider's pods: the name of
    the headless Service the egress cluster resolves."""
    return f"hivemesh-{provider}-pods"


def inbound_socket() -> dict:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": _TLS + "DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": _certificate(),
            "validation_context_sds_secret_config": _sds(CLIENTS_SECRET)}}}


def upstream_socket(provider: str) -> dict:
    name = server_name(provider)
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": _TLS + "UpstreamTlsContext",
        "sni": name,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": _certificate(),
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": name}}]},
                "validation_context_sds_secret_config": _sds(CA_SECRET)}}}}


def ready_listener() -> dict:
    """The listener the readiness check completes a handshake with: the
    inbound listener's certificate and clients file, so it has a TLS
    context exactly when the inbound listener has one. The check presents
    no certificate and nothing is served: the clients file only has to be
    loaded, whatever names it lists."""
    return {"name": READY_CHECK, "address": {"pipe": {"path": READY_SOCKET}},
            "filter_chains": [{
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": _TLS + "DownstreamTlsContext",
                    "require_client_certificate": False,
                    "common_tls_context": {
                        "tls_certificate_sds_secret_configs": _certificate(),
                        "combined_validation_context": {
                            "default_validation_context": {
                                "trust_chain_verification": "ACCEPT_UNTRUSTED"},
                            "validation_context_sds_secret_config": _sds(CLIENTS_SECRET)}}}},
                "filters": [{"name": "envoy.filters.network.echo", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo"}}]}]}


def ready_cluster() -> dict:
    """The readiness check: a TLS handshake with READY_CHECK's listener,
    its certificate checked against the mesh CA (the egress clusters')."""
    return {"name": READY_CHECK, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": READY_CHECK, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": READY_SOCKET}}}}]}]},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": _TLS + "UpstreamTlsContext",
                "common_tls_context": {"validation_context_sds_secret_config": _sds(CA_SECRET)}}},
            "health_checks": [{"timeout": "1s", "interval": "5s", "no_traffic_interval": "1s",
                               "no_traffic_healthy_interval": "5s", "unhealthy_threshold": 3,
                               "healthy_threshold": 1, "tcp_health_check": {}}]}


def expected(source: dict) -> dict:
    """The additions made on the parsed source: what the text must parse to."""
    config = copy.deepcopy(source)
    config["node"] = dict(NODE)
    resources = config["static_resources"]
    for listener in resources["listeners"]:
        if listener["name"] == "inbound":
            (chain,) = listener["filter_chains"]
            chain["transport_socket"] = inbound_socket()
        if listener["name"] == "ready":
            (chain,) = listener["filter_chains"]
            for http_filter in chain["filters"][0]["typed_config"]["http_filters"]:
                if http_filter["name"] == "envoy.filters.http.health_check":
                    http_filter["typed_config"]["cluster_min_healthy_percentages"][
                        READY_CHECK] = {"value": 100}
    index = [listener["name"] for listener in resources["listeners"]].index("ready")
    resources["listeners"].insert(index + 1, ready_listener())
    for cluster in resources["clusters"]:
        if cluster["name"] in PROVIDERS:
            cluster["transport_socket"] = upstream_socket(cluster["name"])
    resources["clusters"].append(ready_cluster())
    return config


# --- the text edits --------------------------------------------------------------

_NODE = f"""\
# File-based SDS needs a node id and cluster; nothing else here reads them.
node: {{id: {NODE["id"]}, cluster: {NODE["cluster"]}}}

"""

_INBOUND_SOCKET = f"""\
    - transport_socket:
        # TLS only; the client must present a certificate from the mesh CA
        # carrying one of the names of the clients file, if it names any.
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {_TLS}DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2]
            # The certificate and the CA from file-based SDS, reloaded
            # when the mounted Secret or the SDS files' volume changes.
            tls_certificate_sds_secret_configs: &mesh_certificate
            - name: {CERTIFICATE_SECRET}
              sds_config:
                path_config_source:{_sds_source_text(CERTIFICATE_SECRET, " " * 18)}
                resource_api_version: V3
            # The clients file, in a volume of its own (per Deployment).
            validation_context_sds_secret_config: &mesh_clients
              name: {CLIENTS_SECRET}
              sds_config:
                path_config_source:{_sds_source_text(CLIENTS_SECRET, " " * 18)}
                resource_api_version: V3
      filters:
"""


_READY_PERCENTAGE = f"""\
                # And this sidecar's TLS side ready (the {READY_CHECK}
                # cluster): not while its certificate, CA or clients file
                # has never loaded, when the inbound listener refuses all.
                {READY_CHECK}: {{value: 100}}
"""

_READY_LISTENER = f"""\
  # The TLS side's readiness check (the {READY_CHECK} cluster completes a
  # handshake here): the inbound listener's certificate and clients file,
  # on a socket of this pod alone. Envoy finishes starting even when an
  # SDS file is broken, leaving the inbound listener without a TLS context
  # (every client refused); this one then has none either, the check
  # fails and /ready answers 503 until a good file comes. A broken file
  # pushed to a running sidecar is refused and the secret kept: still ready.
  - name: {READY_CHECK}
    address:
      pipe: {{path: "{READY_SOCKET}"}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {_TLS}DownstreamTlsContext
          # The check presents no certificate, and nothing is served: the
          # clients file only has to be loaded, whatever names it lists.
          require_client_certificate: false
          common_tls_context:
            tls_certificate_sds_secret_configs: *mesh_certificate
            combined_validation_context:
              default_validation_context: {{trust_chain_verification: ACCEPT_UNTRUSTED}}
              validation_context_sds_secret_config: *mesh_clients
      filters:
      - name: envoy.filters.network.echo
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo

"""

_READY_CLUSTER = f"""
  # The readiness check of this sidecar's TLS side ({READY_CHECK} listener):
  # healthy once a TLS handshake with it completes, its certificate checked
  # against the mesh CA, so once the certificate, the CA and the clients
  # file have all loaded. Every second until then, every 5 s after.
  - name: {READY_CHECK}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {READY_CHECK}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              pipe: {{path: "{READY_SOCKET}"}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": {_TLS}UpstreamTlsContext
        common_tls_context:
          validation_context_sds_secret_config: *mesh_ca
    health_checks:
    - timeout: 1s
      interval: 5s
      no_traffic_interval: 1s
      no_traffic_healthy_interval: 5s
      unhealthy_threshold: 3
      healthy_threshold: 1
      # Healthy once the handshake completes; nothing is sent.
      tcp_health_check: {{}}
"""

_MESH_CA_TEXT = f"""&mesh_ca
              name: {CA_SECRET}
              sds_config:
                path_config_source:{_sds_source_text(CA_SECRET, " " * 18)}
                resource_api_version: V3"""


def _upstream_socket_text(provider: str) -> str:
    """The socket of ``provider``'s cluster; the first one's defines the
    mesh CA's anchor, the others refer to it."""
    name = server_name(provider)
    mesh_ca = _MESH_CA_TEXT if provider == PROVIDERS[0] else "*mesh_ca"
    return f"""\
    # TLS to the pod's sidecar, which must present a certificate from the
    # mesh CA naming {name}; this pod presents its own.
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": {_TLS}UpstreamTlsContext
        sni: {name}
        common_tls_context:
          alpn_protocols: [h2]
          tls_certificate_sds_secret_configs: *mesh_certificate
          combined_validation_context:
            default_validation_context:
              match_typed_subject_alt_names:
              - san_type: DNS
                matcher: {{exact: {name}}}
            validation_context_sds_secret_config: {mesh_ca}
"""


def _replace_once(text: str, pattern: str, replace, what: str) -> str:
    new, count = re.subn(pattern, replace, text, count=1, flags=re.M | re.S)
    if count != 1:
        raise SystemExit(f"envoy_mtls: {what} not found in {SOURCE.name}")
    return new


def render(source_text: str) -> str:
    text = source_text
    text = _replace_once(text, r"^admin:\n", lambda m: _NODE + m.group(0), "the admin block")
    # The inbound listener's one filter chain: the socket as its first key.
    text = _replace_once(
        text, r"(^  - name: inbound\n(?:(?!^  - ).)*?)^    - filters:\n",
        lambda m: m.group(1) + _INBOUND_SOCKET, "the inbound listener's filter chain")
    for provider in PROVIDERS:
        text = _replace_once(
            text, rf"^  - name: {provider}\n",
            lambda m, p=provider: m.group(0) + _upstream_socket_text(p),
            f"the {provider} cluster")
    # The readiness listener requires the check's cluster healthy too.
    text = _replace_once(
        text, r"(^  - name: ready\n(?:(?!^  - ).)*?^                app: \{value: 100\}\n)",
        lambda m: m.group(1) + _READY_PERCENTAGE, "the readiness listener's app percentage")
    # The check's listener after the readiness listener, its cluster last.
    text = _replace_once(text, r"(^  - name: ready\n(?:(?!^  - ).)*?)(^  - name: )",
                         lambda m: m.group(1) + _READY_LISTENER + m.group(2),
                         "the listener after the readiness listener")
    if not text.endswith("\n"):
        raise SystemExit(f"envoy_mtls: {SOURCE.name} does not end with a newline")
    text += _READY_CLUSTER
    text = HEADER + text
    got = yaml.safe_load(text)
    want = expected(yaml.safe_load(source_text))
    if got != want:
        raise SystemExit("envoy_mtls: the text edits do not parse to the expected config")
    return text


def render_sds(secret: str, client_names: Sequence[str] = ()) -> str:
    """The SDS resource file of ``secret`` (the clients file requiring one
    of ``client_names``, if any)."""
    header = (f"# Generated by tools/envoy_mtls.py. DO NOT EDIT.\n#\n"
              f"# The {secret} secret of sidecar-mtls.yaml (file-based SDS), from the\n"
              f"# Secret mounted at {CERT_DIR}: read again when the kubelet swaps\n"
              f"# that directory's ..data symlink.\n")
    if secret == CLIENTS_SECRET:
        header += ("#\n# The inbound listener's: a client certificate from the mesh CA, "
                   + ("carrying one\n# of the names below (DNS or URI subject alt names)."
                      if client_names else "any name.\n# To accept only some names, "
                      "ship instead the file that\n# `python tools/envoy_mtls.py clients "
                      "NAME...` prints (README, Deploy).") + "\n")
    return header + yaml.safe_dump(sds_resources(client_names)[secret], sort_keys=False)


def outputs() -> dict[Path, str]:
    """Every generated file and its fresh content."""
    files = {TARGET: render(SOURCE.read_text())}
    for secret, name in SDS_FILES.items():
        files[TARGET.parent / name] = render_sds(secret)
    return files


def generate() -> None:
    for path, text in outputs().items():
        path.write_text(text)


def check() -> int:
    stale = [path for path, text in outputs().items()
             if not path.exists() or path.read_text() != text]
    for path in stale:
        print(f"{path.relative_to(ROOT)} is out of date; "
              "run: python tools/envoy_mtls.py generate")
    if not stale:
        print(f"{TARGET.relative_to(ROOT)} and its SDS files are up to date")
    return 1 if stale else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("generate")
    sub.add_parser("check")
    clients = sub.add_parser("clients", help=f"print a {SDS_FILES[CLIENTS_SECRET]} whose "
                             "inbound listener accepts only client certificates carrying one "
                             "of NAME (a DNS name, or a URI such as a SPIFFE id)")
    clients.add_argument("names", nargs="+", metavar="NAME")
    args = parser.parse_args()
    if args.cmd == "generate":
        generate()
        return 0
    if args.cmd == "clients":
        sys.stdout.write(render_sds(CLIENTS_SECRET, args.names))
        return 0
    return check()


if __name__ == "__main__":
    sys.exit(main())
