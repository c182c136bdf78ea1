"""Sinks of the derived topics: ClickHouse (chDB embedded, or a ClickHouse server).

- :mod:`app.sinks.clickhouse`: :class:`~app.sinks.clickhouse.ClickHouseStore`, the schema and
  typed inserts/queries, over clickhouse-connect (which drives both chDB and a server).
- :mod:`app.sinks.kafka_clickhouse`: :class:`~app.sinks.kafka_clickhouse.ClickHouseSink`, the
  at-least-once Kafka -> ClickHouse loader (``execution sink``).
"""
