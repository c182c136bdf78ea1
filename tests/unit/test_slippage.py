"""Slippage sign convention (+ = adverse), rounding and the alert rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.models import Side
from tables.slippage import is_alert, round_pips, slippage_pips


@pytest.mark.parametrize(
    "side, expected, fill, pip, slip",
    [
        # the sign table: adverse is positive for both sides
        (Side.BUY, 1.10000, 1.10030, 0.0001, 3.0),  # buy above: adverse
        (Side.BUY, 1.10000, 1.09970, 0.0001, -3.0),  # buy below: favourable
        (Side.SELL, 1.10000, 1.09970, 0.0001, 3.0),  # sell below: adverse
        (Side.SELL, 1.10000, 1.10030, 0.0001, -3.0),  # sell above: favourable
        (Side.BUY, 1.10000, 1.10000, 0.0001, 0.0),
        (Side.BUY, 1.10000, 1.10003, 0.0001, 0.3),  # one point = 0.1 pip
        (Side.BUY, 151.432, 151.457, 0.01, 2.5),  # JPY quote
        (Side.SELL, 2345.60, 2344.90, 0.1, 7.0),  # gold, pip 0.1
        (Side.BUY, 29.500, 29.512, 0.01, 1.2),  # silver, pip 0.01
        ("buy", 1.08125, 1.08131, 0.0001, 0.6),  # str side accepted
        (Side.BUY, 1.0, 1.000025, 0.0001, 0.3),  # 0.25 -> 0.3: half away from zero
        (Side.SELL, 1.0, 1.000025, 0.0001, -0.3),
    ],
)
def test_sign_table_and_rounding(side, expected, fill, pip, slip):
    assert slippage_pips(side, expected, fill, pip) == slip


def test_no_float_noise_and_no_negative_zero():
    raw = (1.10030 - 1.10000) / 0.0001
    assert raw != 3.0  # the noise this module removes
    assert slippage_pips(Side.BUY, 1.10000, 1.10030, 0.0001) == 3.0
    z = slippage_pips(Side.SELL, 1.1, 1.1, 0.0001)
    assert z == 0.0 and str(z) == "0.0"
    assert str(round_pips(-0.04)) == "0.0"


@pytest.mark.parametrize(
    "args",
    [
        (Side.BUY, 1.1, 1.1, 0.0),
        (Side.BUY, 1.1, 1.1, -0.0001),
        (Side.BUY, 0.0, 1.1, 0.0001),
        (Side.BUY, 1.1, float("nan"), 0.0001),
        ("hold", 1.1, 1.1, 0.0001),
    ],
)
def test_bad_inputs_raise(args):
    with pytest.raises(ValueError):
        slippage_pips(*args)


prices = st.integers(min_value=50_000, max_value=200_000)  # in points of a 5-digit quote
offsets = st.integers(min_value=-5_000, max_value=5_000)


@given(prices, offsets)
def test_sides_are_mirror_images(expected_pts, offset):
    expected, fill = expected_pts / 1e5, (expected_pts + offset) / 1e5
    buy = slippage_pips(Side.BUY, expected, fill, 0.0001)
    sell = slippage_pips(Side.SELL, expected, fill, 0.0001)
    assert buy == -sell or buy == sell == 0.0
    # a whole number of points is an exact tenth of a pip
    assert buy == offset / 10
    assert (buy > 0) == (offset > 0)


def test_alert_uses_magnitude_strictly_above_threshold():
    assert is_alert(5.1, 5)
    assert is_alert(-5.1, 5)  # favourable beyond threshold alerts too (as the spec)
    assert not is_alert(5.0, 5)
    assert not is_alert(-5.0, 5)
    assert not is_alert(0.0, 0)
    assert is_alert(0.1, 0)
    with pytest.raises(ValueError):
        is_alert(1.0, -1)
