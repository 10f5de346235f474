"""``hivemesh health``: one gRPC health check, for probes and scripts.

Exit 0 when the service answers SERVING, 1 otherwise (NOT_SERVING, a
service name the server does not know, unreachable, out of time, refused
by TLS). Unlike Kubernetes' built-in ``grpc:`` probe it speaks TLS and
mutual TLS, so a service serving TLS can be probed with an ``exec`` probe.
"""

from __future__ import annotations

import argparse
import math
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hivemesh.client.channel import ChannelTls


def add_parser(sub) -> None:
    health = sub.add_parser("health", help="check a service's gRPC health (exit 0 if SERVING)")
    health.add_argument("target", help="HOST:PORT of the service")
    health.add_argument("--service", default="",
                        help="health service name (default: the whole server)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.add_argument("--tls", action="store_true",
                        help="TLS with the roots gRPC ships with (implied by --tls-ca)")
    health.add_argument("--tls-ca", default=None, help="PEM bundle of the server's CAs")
    health.add_argument("--tls-cert", default=None,
                        help="client certificate, PEM (mutual TLS; with --tls-key)")
    health.add_argument("--tls-key", default=None, help="client private key, PEM")
    health.add_argument("--server-name", default=None,
                        help="name the server's certificate carries, if not the target's host")


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        print("--timeout must be a number of seconds above 0", file=sys.stderr)
        return 2
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.server_name:
        try:
            tls = ChannelTls(ca_file=args.tls_ca, cert_file=args.tls_cert,
                             key_file=args.tls_key, server_name=args.server_name)
            # Checked as a set (the key is the certificate's, the CA bundle
            # holds certificates): gRPC would only fail the handshake.
            credentials = tls.credentials(tls.checked_contents())
        except ValueError as exc:
            print(f"invalid TLS arguments: {exc}", file=sys.stderr)
            return 2
    if tls is None:
        channel = grpc.insecure_channel(args.target)
    else:
        options = ([("grpc.ssl_target_name_override", tls.server_name)]
                   if tls.server_name else [])
        channel = grpc.secure_channel(args.target, credentials, options=options)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"{err.code().name}: {err.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(status)
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1
