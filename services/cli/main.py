"""``hivemesh`` command line.

    hivemesh up                      # run the mesh and a demonstration through it
    hivemesh up --keep-running       # ... and keep serving until Ctrl-C
    hivemesh serve artifact|information|llm|memory|orchestrator [--host H] [--port N] [--data-dir D]
    hivemesh health HOST:PORT [--service NAME] [--tls-ca F [--tls-cert F --tls-key F]]

``serve`` prints ``listening on HOST:PORT`` as its first line on stdout;
logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

SERVICES = ("artifact", "information", "llm", "memory", "orchestrator")


def _service(name: str):
    """(settings class, open backend, create_server) of a service."""
    if name == "artifact":
        from hivemesh.services.artifact.server import create_server, open_backend
        from hivemesh.services.artifact.settings import ArtifactSettings
        return ArtifactSettings, open_backend, create_server
    if name == "llm":
        from hivemesh.services.llm.server import create_server, open_backends
        from hivemesh.services.llm.settings import LlmSettings
        return LlmSettings, open_backends, create_server
    if name == "orchestrator":
        from hivemesh.services.orchestrator.server import create_server, open_backend
        from hivemesh.services.orchestrator.settings import OrchestratorSettings
        return OrchestratorSettings, open_backend, create_server
    if name == "memory":
        from hivemesh.services.memory.server import create_server, open_backend
        from hivemesh.services.memory.settings import MemorySettings
        return MemorySettings, open_backend, create_server
    from hivemesh.services.information.server import create_server, open_store
    from hivemesh.services.information.settings import InformationSettings
    return InformationSettings, open_store, create_server


async def _run_service(args: argparse.Namespace) -> int:
    from hivemesh.runtime.logs import configure_logging, hide_values, secret_values
    from hivemesh.runtime.server import host_port, run_until_signalled
    from hivemesh.runtime.settings import check_dsns, secrets_dir
    from hivemesh.runtime.telemetry import configure_metrics, configure_tracing, shutdown_within

    settings_cls, open_backend, create_server = _service(args.service)
    settings = settings_cls(_secrets_dir=secrets_dir())
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        # Validated as the environment's values are (model_copy would not).
        settings.server = type(settings.server).model_validate(
            {**settings.server.model_dump(), **overrides})
    if args.data_dir is not None and hasattr(settings, "data_dir"):
        settings.data_dir = Path(args.data_dir)
    configure_logging(args.service, settings.server.log_level)
    hide_values(secret_values(settings))
    check_dsns(settings)
    providers = [p for p in (configure_tracing(f"hivemesh-{args.service}"),
                             configure_metrics(f"hivemesh-{args.service}")) if p is not None]
    backend = await open_backend(settings)
    try:
        running, port = await create_server(settings, backend)
        await run_until_signalled(running, settings.server, ready=lambda: print(
            f"listening on {host_port(settings.server.host, port)}", flush=True))
    finally:
        await backend.close()
        shutdown_within(providers)
    return 0


def _directory(value: str) -> str:
    """An empty --data-dir names no directory (it would be the working one)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty: give a directory or leave the option out")
    return value


def _serve(args: argparse.Namespace) -> int:
    from pydantic_settings import SettingsError

    from hivemesh.runtime import eventloop
    from hivemesh.runtime.settings import InvalidSetting, secrets_dir, variables_not_json
    try:
        return eventloop.run(_run_service(args))
    except ValidationError as exc:
        # Never the input values: they may hold a secret.
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False, include_context=False))
        print(f"invalid {args.service} settings:\n{problems}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        # A JSON value that does not parse, from the environment or the
        # secrets directory, or a directory too large. pydantic-settings
        # names only the top field: name the variables (never their values).
        settings_cls = _service(args.service)[0]
        named = "".join(f"\n  {name} is not JSON: a list or object setting is read as JSON, "
                        "e.g. '[\"a\", \"b\"]' or '{\"key\": \"value\"}'"
                        for name in variables_not_json(settings_cls, secrets=secrets_dir()))
        print(f"invalid {args.service} settings:\n  {exc}{named}", file=sys.stderr)
        return 2
    except (eventloop.InvalidEventLoop, InvalidSetting) as exc:
        print(f"invalid {args.service} settings:\n  {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"{args.service} could not start: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hivemesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (0 picks a free one)")
    serve.add_argument("--data-dir", default=None, type=_directory,
                       help="where embedded backends keep data")
    up = sub.add_parser("up", help="start the mesh and run the demonstration")
    up.add_argument("--data-dir", default=None, type=_directory,
                    help="keep data here (default: a fresh temporary directory)")
    up.add_argument("--keep-running", action="store_true",
                    help="keep the services running after the demonstration")
    from hivemesh.cli import health
    health.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "health":
        return health.run(args)
    from hivemesh.cli.demo import run_up
    return run_up(args.data_dir, args.keep_running)


if __name__ == "__main__":
    sys.exit(main())
