"""The Faust application: one app, configured from :class:`app.settings.Settings`.

Run at-least-once (Faust's ``exactly_once`` has open crash/duplicate bugs and Tansu has no
transactions); every effect downstream is idempotent instead: deterministic ids, dedupe
tables, ReplacingMergeTree, the connector's client-order-id dedupe.
"""

from __future__ import annotations

import faust

from app import faust_patches
from app.settings import Settings, get_settings
from tables.idempotency import KeyPartitioner


def create_app(settings: Settings | None = None) -> faust.App:
    s = settings or get_settings()
    faust_patches.install(s)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    extra: dict = {}
    if s.consumer_group_instance_id and s.effective("consumer_static_membership"):
        extra["consumer_group_instance_id"] = s.consumer_group_instance_id
    if s.canonical_url:
        extra["canonical_url"] = s.canonical_url
    if s.kafka_sasl_mechanism or s.kafka_ssl:
        extra["broker_credentials"] = _credentials(s)
    return faust.App(
        s.app_id,
        broker=s.kafka_bootstrap,
        broker_client_id=f"{s.app_id}-worker",  # the broker's logs and quotas tell the clients apart
        store="rocksdb://",
        datadir=str(s.data_dir / "faust"),
        topic_partitions=s.topic_partitions,
        topic_replication_factor=s.topic_replication_factor,
        processing_guarantee="at_least_once",
        broker_commit_interval=s.commit_interval,
        broker_session_timeout=s.effective("broker_session_timeout"),
        broker_rebalance_timeout=s.effective("broker_rebalance_timeout"),
        broker_heartbeat_interval=s.effective("broker_heartbeat_interval"),
        producer_max_batch_size=s.effective("producer_max_batch_size"),
        producer_linger=s.effective("producer_linger_ms") / 1000.0,
        producer_partitioner=KeyPartitioner(),
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        web_port=s.web_port,
        web_bind=s.web_host,
        web_in_thread=False,
        table_cleanup_interval=30.0,
        autodiscover=False,
        **extra,
    )


def _credentials(s: Settings):
    ctx = s.kafka_ssl_context() if s.kafka_ssl else None
    if s.kafka_sasl_mechanism:
        password = s.kafka_password.get_secret_value() if s.kafka_password else ""
        if s.kafka_sasl_mechanism.upper().startswith("SCRAM"):
            return faust.SASLCredentials(
                username=s.kafka_username, password=password, mechanism=s.kafka_sasl_mechanism, ssl_context=ctx
            )
        return faust.SASLCredentials(username=s.kafka_username, password=password, ssl_context=ctx)
    return faust.SSLCredentials(ctx)
