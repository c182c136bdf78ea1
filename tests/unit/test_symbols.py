"""Symbol table: built-in facts, pip rules, user extension, unknown symbols."""

from __future__ import annotations

import json

import pytest

from tables.symbols import (
    BUILTIN,
    DEFAULT_SYMBOLS,
    ENV_VAR,
    SymbolConfigError,
    SymbolSpec,
    SymbolTable,
    UnknownSymbol,
)

MAJORS_AND_CROSSES = (
    "EURUSD GBPUSD AUDUSD NZDUSD USDCHF USDCAD USDJPY EURJPY GBPJPY EURGBP EURCHF AUDJPY".split()
)


@pytest.mark.parametrize(
    "symbol, digits, point, pip, contract, quote",
    [
        ("EURUSD", 5, 0.00001, 0.0001, 100_000, "USD"),
        ("GBPUSD", 5, 0.00001, 0.0001, 100_000, "USD"),
        ("USDCHF", 5, 0.00001, 0.0001, 100_000, "CHF"),
        ("EURGBP", 5, 0.00001, 0.0001, 100_000, "GBP"),
        ("USDJPY", 3, 0.001, 0.01, 100_000, "JPY"),
        ("GBPJPY", 3, 0.001, 0.01, 100_000, "JPY"),
        ("XAUUSD", 2, 0.01, 0.1, 100, "USD"),
        ("XAGUSD", 3, 0.001, 0.01, 5_000, "USD"),
    ],
)
def test_builtin_facts(symbol, digits, point, pip, contract, quote):
    s = DEFAULT_SYMBOLS[symbol]
    assert (s.digits, s.point, s.pip_size, s.contract_size, s.quote_currency) == (
        digits,
        point,
        pip,
        contract,
        quote,
    )


def test_builtins_cover_majors_crosses_and_metals():
    assert set(MAJORS_AND_CROSSES) | {"XAUUSD", "XAGUSD"} == set(DEFAULT_SYMBOLS) == set(BUILTIN)
    assert len(DEFAULT_SYMBOLS) == 14


@pytest.mark.parametrize("digits, pip", [(5, 0.0001), (4, 0.0001), (3, 0.01), (2, 0.01)])
def test_pip_rule_fractional_and_classic_quotes(digits, pip):
    s = SymbolSpec(symbol="EURUSD" if digits in (4, 5) else "USDJPY", digits=digits)
    assert s.pip_size == pip
    assert s.points_per_pip == (10 if digits in (3, 5) else 1)


def test_points_and_pips_helpers():
    eur, gold = DEFAULT_SYMBOLS["EURUSD"], DEFAULT_SYMBOLS["XAUUSD"]
    assert eur.pips_to_points(3) == 30
    assert gold.pips_to_points(3) == 30
    assert DEFAULT_SYMBOLS["USDJPY"].pips_to_points(2.5) == 25
    assert eur.pips(0.00025) == pytest.approx(2.5)
    assert eur.round_price(1.1234567) == 1.12346


def test_unknown_symbol_is_a_clear_error():
    with pytest.raises(UnknownSymbol) as exc:
        DEFAULT_SYMBOLS["EURSEK"]
    assert exc.value.symbol == "EURSEK"
    assert "EURSEK" in str(exc.value) and ENV_VAR in str(exc.value)
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, ValueError)
    with pytest.raises(UnknownSymbol):
        DEFAULT_SYMBOLS.pip_size("EURSEK")
    assert "EURSEK" not in DEFAULT_SYMBOLS
    assert DEFAULT_SYMBOLS.get("EURSEK") is None  # Mapping semantics


def test_user_dict_adds_and_overrides():
    t = SymbolTable(
        {
            "EURSEK": {"digits": 5},
            "EURUSD": {"contract_size": 10_000},
            "XAUUSD": {"pip_size": 0.01},
            "XPTUSD": {"digits": 2, "pip_size": 0.1, "contract_size": 50},
        }
    )
    assert t["EURSEK"].pip_size == 0.0001 and t["EURSEK"].contract_size == 100_000
    assert t["EURSEK"].quote_currency == "SEK"
    assert t["EURUSD"].contract_size == 10_000 and t["EURUSD"].pip_size == 0.0001
    assert t["XAUUSD"].pip_size == 0.01 and t["XAUUSD"].contract_size == 100
    assert t["XPTUSD"].contract_size == 50
    assert DEFAULT_SYMBOLS["EURUSD"].contract_size == 100_000  # defaults untouched


def test_changing_digits_rederives_point_and_pip():
    t = SymbolTable({"EURUSD": {"digits": 4}})
    assert (t["EURUSD"].point, t["EURUSD"].pip_size) == (0.0001, 0.0001)


def test_fx_contract_size_applies_to_fx_not_metals():
    t = SymbolTable({"EURSEK": {"digits": 5}}, fx_contract_size=10_000)
    assert t.contract_size("EURUSD") == 10_000
    assert t.contract_size("EURSEK") == 10_000
    assert t.contract_size("XAUUSD") == 100
    assert t.contract_size("XAGUSD") == 5_000


def test_spec_objects_and_no_defaults():
    t = SymbolTable({"EURUSD": SymbolSpec(symbol="EURUSD", digits=4)}, defaults=False)
    assert list(t) == ["EURUSD"] and t["EURUSD"].pip_size == 0.0001
    with pytest.raises(UnknownSymbol):
        t["GBPUSD"]


@pytest.mark.parametrize(
    "entries, match",
    [
        ({"XPTUSD": {"digits": 2, "contract_size": 50}}, "pip_size must be given"),
        ({"XPTUSD": {"digits": 2, "pip_size": 0.1}}, "contract_size must be given"),
        ({"EURSEK": {"digits": 6}}, "no default pip"),
        ({"EURSEK": {}}, "digits"),
        ({"eursek": {"digits": 5}}, "six upper-case"),
        ({"EURSEK": {"digits": 5, "pip_size": 0.000015}}, "whole number of points"),
        ({"EURSEK": {"digits": 5, "point": 0.0001}}, "does not match"),
        ({"EURSEK": {"digits": 5, "contract_size": -1}}, "contract_size"),
        ({"EURSEK": {"digits": 5, "colour": "red"}}, "colour"),
        ({"EURSEK": {"symbol": "EURNOK", "digits": 5}}, "another symbol"),
        ({"EURSEK": 5}, "must be an object"),
    ],
)
def test_bad_user_entries_are_refused(entries, match):
    with pytest.raises(SymbolConfigError, match=match):
        SymbolTable(entries)


def test_json_file_and_env_var(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"EURSEK": {"digits": 5}, "XAUUSD": {"pip_size": 0.01}}))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"symbols": {"USDMXN": {"digits": 5}}, "fx_contract_size": 1000}))

    t = SymbolTable.from_file(plain)
    assert t["EURSEK"].pip_size == 0.0001 and t["XAUUSD"].pip_size == 0.01

    t = SymbolTable.from_env({ENV_VAR: str(wrapped)})
    assert t["USDMXN"].contract_size == 1000 and t["EURUSD"].contract_size == 1000
    assert "EURSEK" not in t

    # Layering: env file, then explicit path, then dict entries.
    t = SymbolTable.load({"XAUUSD": {"contract_size": 10}}, path=plain, environ={ENV_VAR: str(wrapped)})
    assert t["USDMXN"].digits == 5 and t["EURSEK"].digits == 5
    assert (t["XAUUSD"].pip_size, t["XAUUSD"].contract_size) == (0.01, 10)

    assert len(SymbolTable.from_env({})) == 14
    assert len(SymbolTable.from_env({ENV_VAR: ""})) == 14


def test_env_var_read_from_process_environment(tmp_path, monkeypatch):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"EURSEK": {"digits": 5}}))
    monkeypatch.setenv(ENV_VAR, str(f))
    assert "EURSEK" in SymbolTable.from_env()


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "symbols file"),
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"symbols": {}, "extra": 1}', "unknown keys"),
        ('{"symbols": []}', "must be an object"),
        ('{"symbols": {}, "fx_contract_size": "big"}', "must be a number"),
    ],
)
def test_bad_symbols_files(tmp_path, content, match):
    f = tmp_path / "s.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(SymbolConfigError, match=match):
        SymbolTable.from_file(f)
