#!/bin/bash
# preStop hook of the Envoy sidecar. Kubernetes runs it when the pod begins
# to terminate, at the same moment the service gets SIGTERM:
#   1. fail Envoy's readiness (/ready on :9902 answers 503) and mark every
#      downstream connection for draining,
#   2. drain the inbound listener gracefully: clients get GOAWAY and move to
#      other pods while calls already in flight finish,
#   3. stay up ENVOY_DRAIN_S seconds, longer than the service's drain delay
#      plus grace period, so that those calls (and the service's own calls
#      through the egress listeners) still have a proxy; then Kubernetes
#      sends SIGTERM and Envoy exits.
# The Envoy image has bash but no curl: the admin API is called over
# /dev/tcp.
set -u
admin_port="${ENVOY_ADMIN_PORT:-9901}"

post() {
  exec 3<>"/dev/tcp/127.0.0.1/${admin_port}" || return 1
  printf 'POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' \
    "$1" >&3
  cat <&3 >/dev/null
  exec 3<&- 3>&-
}

post /healthcheck/fail
post '/drain_listeners?graceful&inboundonly'
sleep "${ENVOY_DRAIN_S:-40}"
