"""Start hivemesh services as child processes and find their addresses.

Each child runs ``hivemesh serve <service> --port 0`` and announces itself
with ``listening on HOST:PORT`` as the first line on stdout. Used by
``hivemesh up``, the benchmarks and the tests.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServiceDidNotStart(RuntimeError):
    """A service exited, or said something else, before its address line."""


@dataclass
class ServiceProcess:
    service: str
    process: subprocess.Popen
    address: str
    log_path: Path | None = None

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (graceful shutdown), then SIGKILL if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown at all (for durability tests)."""
        self.process.kill()
        self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


def start_service(service: str, *, data_dir: Path | None = None, host: str = "127.0.0.1",
                  env: dict[str, str] | None = None, log_path: Path | None = None,
                  timeout_s: float = 30.0, extra_args: list[str] | None = None
                  ) -> ServiceProcess:
    cmd = [sys.executable, "-m", "hivemesh.cli.main", "serve", service, "--host", host,
           "--port", "0"]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    cmd += extra_args or []
    stderr = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr,
                            env={**os.environ, **(env or {})})
    if log_path:
        stderr.close()
    try:
        line = _first_line(proc, timeout_s)
    except BaseException:  # interrupted (a signal): the process is nobody's yet
        proc.kill()
        proc.wait()
        raise
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait()
        # The log itself may not outlive the caller (a temporary directory):
        # its end, where the service says why, goes into the message.
        raise ServiceDidNotStart(f"{service} did not start (exit {proc.returncode}); "
                                 f"first output: {line!r}"
                                 + (f"; log {log_path}:\n{_tail(log_path)}" if log_path else ""))
    return ServiceProcess(service, proc, line.removeprefix("listening on ").strip(), log_path)


def _tail(path: Path, max_bytes: int = 4096) -> str:
    """The last lines of a log, at most ``max_bytes`` of them."""
    try:
        data = path.read_bytes()[-max_bytes:]
    except OSError as exc:
        return f"(unreadable: {exc.strerror})"
    return data.decode(errors="replace").rstrip()


def _first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
    sel.close()
    return buf.split(b"\n", 1)[0].decode(errors="replace")


@dataclass
class Mesh:
    """A set of running service processes, stopped together."""

    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def stop(self) -> None:
        for proc in reversed(list(self.services.values())):
            proc.stop()
        self.services.clear()
