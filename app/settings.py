"""Typed infrastructure settings: environment variables with the prefix ``EXECUTION_``.

Operational settings (order defaults, idempotency window, slippage threshold, ...) are not
here: they come from the central hub, see :mod:`app.config`.  This module holds what a
platform engineer sets per deployment: where the brokers are, where state lives, and the
per-broker tuning profile.
"""

from __future__ import annotations

from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import ssl


class Profile(str, Enum):
    #: The embedded stack started by :mod:`app.local`: Tansu, nats-server, chDB.
    LOCAL = "local"
    #: Apache Kafka, a NATS cluster and a ClickHouse server: Faust's production defaults.
    PRODUCTION = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXECUTION_", extra="ignore")

    profile: Profile = Profile.LOCAL

    # --- where things are -------------------------------------------------------------
    kafka_bootstrap: str = "kafka://127.0.0.1:9092"
    nats_url: str = "nats://127.0.0.1:4222"
    #: ``chdb:///path`` for the embedded engine, ``clickhouse://user@host:8123/db`` (or
    #: ``clickhouses://`` for TLS) for a server; both through clickhouse-connect.  Empty means
    #: ``chdb:///<data_dir>/chdb``.
    clickhouse_dsn: str = ""
    data_dir: Path = Path(".execution")

    # --- topology -----------------------------------------------------------------------
    app_id: str = "execution"
    topic_partitions: int = Field(8, ge=1)
    topic_replication_factor: int = Field(1, ge=1)
    web_port: int = 8012
    web_host: str = "0.0.0.0"
    #: The bridge's and the sink's HTTP servers (``/livez``, ``/readyz``, ``/metrics``; the
    #: sink's ``/query``); 0: none.
    bridge_web_port: int = Field(8013, ge=0)
    sink_web_port: int = Field(8014, ge=0)
    #: After a batch of fewer fills than it asks for, the bridge waits this long before its
    #: next JetStream fetch (ms), so the fills of a busy market leave in fewer, fuller produce
    #: requests (``bench/requests.py``); a fill after a quiet spell is not delayed.  The
    #: signals route never waits: a signal's latency to the broker is what is measured.
    bridge_fills_linger_ms: float = Field(10.0, ge=0.0, le=1000.0)
    #: The bridge's notifier (order updates and alerts to NATS) asks the broker to hold each
    #: fetch until this many bytes are there, or ``consumer_fetch_max_wait_ms`` passed: fewer,
    #: fuller fetches for at most that wait per update.
    notifier_fetch_min_bytes: int = Field(16384, ge=1)
    #: Where ``execution sql`` sends its query: the sink that owns the embedded chDB.
    sink_url: str = "http://127.0.0.1:8014"
    #: How other workers reach this one's web server (table queries are forwarded to the
    #: owner of the key's partition); default ``http://<hostname>:<web_port>``.
    canonical_url: str | None = None
    #: Static group membership (KIP-345) for StatefulSet pods: set to the pod name so a
    #: restarted pod gets its partitions back without a rebalance.  Used only where
    #: ``consumer_static_membership`` is on (the production profile).
    consumer_group_instance_id: str | None = None

    # --- credentials (never logged: SecretStr) -----------------------------------------
    kafka_sasl_mechanism: str | None = None  # e.g. "SCRAM-SHA-512" or "PLAIN"
    kafka_username: str | None = None
    kafka_password: SecretStr | None = None
    kafka_ssl: bool = False
    #: The CA bundle that signed the brokers' certificates (PEM); the system's CAs when unset.
    kafka_ssl_cafile: Path | None = None
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_creds_file: Path | None = None
    #: TLS to NATS (also implied by a ``tls://`` URL) with this CA bundle (PEM); the
    #: system's CAs when unset.
    nats_tls: bool = False
    nats_tls_cafile: Path | None = None
    clickhouse_password: SecretStr | None = None
    #: The bearer token of the mutating web endpoints (cancel, modify, close) and of the
    #: NATS command subjects' forwarding between workers.  Unset or empty: those endpoints
    #: answer 403 (they are off, never open).  ``EXECUTION_API_TOKEN``.
    api_token: SecretStr | None = None

    # --- broker tuning: None means "the profile's value" ------------------------------
    #: Tansu (local profile): a consumer group join waits for half the session timeout before
    #: it completes, so Faust's production default of 60 s makes every start and rebalance
    #: take 30 s.  Locally a 4 s session with a 1 s heartbeat: a join takes 2 s; a SIGKILLed
    #: worker's restart joins, then joins again once the dead member's session has expired,
    #: and is back in about 10 s (13 s with a 6 s session).  Real Kafka keeps Faust's defaults.
    broker_session_timeout: float | None = None
    broker_rebalance_timeout: float | None = None
    broker_heartbeat_interval: float | None = None
    #: Records per produced batch, in bytes (aiokafka's ``max_batch_size``).  Tansu 0.6
    #: reports a wrong end offset (ListOffsets) for a partition whose last record batch holds
    #: more than one record; Faust reads that offset to decide when changelog recovery is
    #: complete, so it stopped early and table updates were lost.  The local profile used to
    #: force one record per batch (1 byte), which cost ~20x in produce throughput (raw
    #: produce ~77k -> ~3.5k msg/s here); it now batches like production and corrects the
    #: end offsets instead (``broker_end_offsets_check``).  Benchmarks print both.
    producer_max_batch_size: int | None = None
    #: How long a producer waits for more records before it sends a batch (ms): fewer,
    #: fuller produce requests (every request is a system call and a broker round trip) for
    #: up to this much latency per hop.  For the worker's Faust producer, the bridge's and the
    #: sink's.
    producer_linger_ms: int | None = None
    #: Check each end offset with a fetch (its response carries the right high watermark):
    #: :func:`app.kafka_io.end_offsets`, also used by Faust's recovery.  Tansu only.
    broker_end_offsets_check: bool | None = None
    #: How long a consumer fetch may wait at the broker for records (ms).  Tansu answers a
    #: waiting fetch only when the wait ends, so Faust's fixed 1500 made every Kafka hop cost
    #: up to 1.5 s (``bench/fetch_wait.py``); the local profile polls every 10 ms instead.
    consumer_fetch_max_wait_ms: int | None = None
    #: Join the group with ``consumer_group_instance_id`` (static membership).  Off on Tansu
    #: 0.6: of two workers, one SIGKILLed and restarted under its instance id re-joins the
    #: group every few seconds and never completes its SyncGroup (the leader is not asked to
    #: rebalance), so it never gets partitions.  Without it the restarted worker joins as a
    #: new member and the group rebalances (``tests/test_operate.py``).
    consumer_static_membership: bool | None = None
    #: Replay table changelogs in bulk at recovery: a plain consumer reads each active
    #: changelog partition and writes the raw records into the table's RocksDB partition
    #: (app/faust_patches.py, 10) instead of Faust's record-by-record replay (~4,000 records/s).
    #: On in both profiles; off gives Faust's own replay.  ``EXECUTION_BULK_RECOVERY``.
    bulk_recovery: bool | None = None
    commit_interval: float = 1.0
    #: The orders and positions agents take up to this many records at a time and wait for
    #: their outputs' acks once per batch (agents/common.py:Batch) ...
    agent_batch_max: int = Field(500, ge=1)
    #: ... waiting at most this long (seconds) for a batch to fill: the latency it may add.
    agent_batch_within: float = Field(0.002, gt=0)

    # --- derived ------------------------------------------------------------------------
    def effective(self, name: str) -> Any:
        """The value of a tuning setting after applying the profile's default."""
        value = getattr(self, name)
        if value is not None:
            return value
        return _PROFILE_DEFAULTS[self.profile][name]

    @property
    def kafka_bootstrap_servers(self) -> str:
        """``host:port[,host:port]`` for aiokafka (Faust takes the ``kafka://`` URL)."""
        return ",".join(u.split("://", 1)[-1] for u in self.kafka_bootstrap.split(";"))

    @property
    def resolved_clickhouse_dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb:///{(self.data_dir / 'chdb').resolve()}"

    def aiokafka_common(self) -> dict[str, Any]:
        """Connection options shared by every aiokafka client of the service."""
        opts: dict[str, Any] = {"bootstrap_servers": self.kafka_bootstrap_servers}
        if self.kafka_sasl_mechanism:
            opts.update(
                security_protocol="SASL_SSL" if self.kafka_ssl else "SASL_PLAINTEXT",
                sasl_mechanism=self.kafka_sasl_mechanism,
                sasl_plain_username=self.kafka_username,
                sasl_plain_password=self.kafka_password.get_secret_value() if self.kafka_password else None,
            )
        elif self.kafka_ssl:
            opts["security_protocol"] = "SSL"
        if self.kafka_ssl:
            opts["ssl_context"] = self.kafka_ssl_context()
        return opts

    def group_consumer_options(self, client: str, group_id: str | None = None) -> dict[str, Any]:
        """aiokafka options of a service's own consumer group (the ClickHouse sink, the
        bridge's notifier; client id ``{app_id}-{client}``, the group's by default): manual
        commits, from the earliest record of a new group, and the profile's session, rebalance
        and heartbeat times."""
        return {
            **self.aiokafka_common(),
            "client_id": f"{self.app_id}-{client}",
            "group_id": group_id or f"{self.app_id}-{client}",
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": int(self.effective("broker_session_timeout") * 1000),
            "rebalance_timeout_ms": int(self.effective("broker_rebalance_timeout") * 1000),
            "heartbeat_interval_ms": int(self.effective("broker_heartbeat_interval") * 1000),
        }

    def kafka_ssl_context(self) -> "ssl.SSLContext":
        """The TLS context of every Kafka client (aiokafka and Faust): the brokers' certificates
        checked against ``kafka_ssl_cafile`` (or the system's CAs), host names verified."""
        import ssl

        return ssl.create_default_context(cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None)

    def producer_options(self) -> dict[str, Any]:
        """aiokafka producer options: acks from all in-sync replicas, profile batch size and linger."""
        opts = self.aiokafka_common()
        opts.update(acks="all", max_batch_size=self.effective("producer_max_batch_size"),
                    linger_ms=self.effective("producer_linger_ms"))
        return opts

    @property
    def api_token_value(self) -> str | None:
        """The API token, or None when none is configured (an empty value is none)."""
        value = self.api_token.get_secret_value() if self.api_token else ""
        return value or None

    def nats_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"servers": self.nats_url.split(",")}
        if self.nats_user:
            opts["user"] = self.nats_user
            opts["password"] = self.nats_password.get_secret_value() if self.nats_password else None
        if self.nats_creds_file:
            opts["user_credentials"] = str(self.nats_creds_file)
        if self.nats_tls or self.nats_tls_cafile or self.nats_url.startswith("tls://"):
            import ssl

            opts["tls"] = ssl.create_default_context(cafile=str(self.nats_tls_cafile) if self.nats_tls_cafile else None)
        return opts

    def describe(self) -> dict[str, Any]:
        """Settings safe to print: secrets masked by pydantic's SecretStr."""
        out = self.model_dump(mode="json")
        for name in ("kafka_password", "nats_password", "clickhouse_password", "api_token"):
            if out.get(name):
                out[name] = "**********"
        for name in _TUNING:
            out[name] = self.effective(name)
        out["clickhouse_dsn"] = self.resolved_clickhouse_dsn  # where the data is (the chDB path by default)
        return out


_TUNING = (
    "broker_session_timeout",
    "broker_rebalance_timeout",
    "broker_heartbeat_interval",
    "producer_max_batch_size",
    "producer_linger_ms",
    "broker_end_offsets_check",
    "consumer_fetch_max_wait_ms",
    "consumer_static_membership",
    "bulk_recovery",
)

_PROFILE_DEFAULTS: dict[Profile, dict[str, Any]] = {
    Profile.LOCAL: {
        "broker_session_timeout": 4.0,
        "broker_rebalance_timeout": 6.0,
        "broker_heartbeat_interval": 1.0,
        "producer_max_batch_size": 16384,
        "producer_linger_ms": 0,
        "broker_end_offsets_check": True,
        "consumer_fetch_max_wait_ms": 10,
        "consumer_static_membership": False,
        "bulk_recovery": True,
    },
    # Faust's own production defaults, but for the fetch wait.
    Profile.PRODUCTION: {
        "broker_session_timeout": 60.0,
        "broker_rebalance_timeout": 60.0,
        "broker_heartbeat_interval": 3.0,
        "producer_max_batch_size": 16384,
        "producer_linger_ms": 0,
        "broker_end_offsets_check": False,
        # Not Faust's 1,500: aiokafka keeps one fetch in flight per broker and leaves out of it
        # every partition still holding fetched records, so a record arriving there waits for
        # that fetch, up to the whole wait (bench/idle.py: 50 costs an idle worker no more).
        "consumer_fetch_max_wait_ms": 50,
        "consumer_static_membership": True,
        "bulk_recovery": True,
    },
}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
