"""Settings as ops see them (``execution settings``)."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings


def test_settings_show_where_the_clickhouse_data_is_and_mask_secrets(tmp_path: Path):
    shown = Settings(data_dir=tmp_path, kafka_password="s3cret", api_token="t0ken").describe()
    assert shown["clickhouse_dsn"] == f"chdb:///{(tmp_path / 'chdb').resolve()}"  # not ""
    assert shown["kafka_password"] == shown["api_token"] == "**********"
    server = Settings(clickhouse_dsn="clickhouse://analyst@ch:8123/default").describe()
    assert server["clickhouse_dsn"] == "clickhouse://analyst@ch:8123/default"
    assert (shown["bridge_web_port"], shown["sink_web_port"]) == (8013, 8014)
