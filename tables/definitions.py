"""The Faust tables of the service (RocksDB stores, changelog topics) and their codecs.

Every table is written by exactly one agent, sequentially, so a read-modify-write never
interleaves with another:

* ``orders`` (order_id → :class:`Order`) and ``signal_orders`` (signal_id →
  :class:`SignalSeen`) are written by the orders agent, which also keeps ``open_orders``,
  the orders not final yet, in memory (:mod:`tables.open_orders`: derived from ``orders``,
  no changelog).  Their keys are co-partitioned with ``signal_approved`` by
  construction (:func:`tables.idempotency.order_id_for`), so the broker's fills, keyed by
  order id, join the ``orders`` table on the same worker without a repartition.
* ``positions`` (``{account}:{symbol}`` → :class:`Position`) is written by the positions
  agent from the ``executions`` topic, which is keyed (repartitioned) by position key.

Values are stored as the models' JSON (orjson) through registered codecs, so tables hand
out models, never dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Generic, TypeVar

import faust
from faust.serializers import codecs
from pydantic import BaseModel

from app.models import Order, Position, to_json
from tables.idempotency import SignalSeen
from tables.open_orders import OpenOrders

M = TypeVar("M", bound=BaseModel)


class ModelCodec(codecs.Codec, Generic[M]):
    """A Faust codec for one pydantic model: orjson bytes on the wire and in RocksDB."""

    def __init__(self, model: type[M], **kwargs: Any) -> None:
        self.model = model
        super().__init__(**kwargs)

    def _dumps(self, obj: Any) -> bytes:
        return obj if isinstance(obj, bytes) else to_json(obj)

    def _loads(self, s: bytes) -> M:
        return self.model.model_validate_json(s)


class SignalSeenCodec(codecs.Codec):
    def _dumps(self, obj: Any) -> bytes:
        return obj if isinstance(obj, bytes) else obj.to_bytes()

    def _loads(self, s: bytes) -> SignalSeen:
        return SignalSeen.from_bytes(s)


ORDER_CODEC = "execution.order"
POSITION_CODEC = "execution.position"
SIGNAL_SEEN_CODEC = "execution.signal_seen"
codecs.register(ORDER_CODEC, ModelCodec(Order))
codecs.register(POSITION_CODEC, ModelCodec(Position))
codecs.register(SIGNAL_SEEN_CODEC, SignalSeenCodec())


def stored_as(codec: str) -> type:
    """A Faust ``value_type`` that names ``codec``: Faust picks a table's serializer from its
    value type, and hands the decoded object back through ``from_data``."""

    class Stored:
        _options = SimpleNamespace(serializer=codec)

        @classmethod
        def from_data(cls, value: Any, preferred_type: Any = None) -> Any:
            return value

    Stored.__name__ = f"Stored[{codec}]"
    return Stored


@dataclass(frozen=True)
class Tables:
    signal_orders: faust.Table
    orders: faust.Table
    positions: faust.Table
    open_orders: OpenOrders


def define_tables(app: faust.App) -> Tables:
    def table(name: str, codec: str, help: str) -> faust.Table:
        return app.Table(name, key_type=bytes, value_type=stored_as(codec), help=help)

    return Tables(
        signal_orders=table("signal_orders", SIGNAL_SEEN_CODEC, "signal_id -> order_id and first seen (24 h window)"),
        orders=table("orders", ORDER_CODEC, "order_id -> Order (the order state machine)"),
        positions=table("positions", POSITION_CODEC, "{account}:{symbol} -> net Position"),
        open_orders=OpenOrders(),
    )
