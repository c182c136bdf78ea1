"""Symbol table: digits, point, pip size, contract size and quote currency per symbol.

Conventions (MT5):

* ``point`` is the quote's smallest increment, always ``10 ** -digits``.
* FX: a pip is ``10 x point`` for 3- and 5-digit (fractional-pip) quotes and ``point``
  for 2- and 4-digit quotes: 0.0001 for EURUSD, 0.01 for USDJPY, whatever the digits.
* Metals have no standard pip; it is stated per symbol.  The built-ins follow the common
  retail-broker convention "one pip = ten points" (the same ratio as 5-digit FX):

  - ``XAUUSD``: 2 digits, point 0.01, **pip 0.1** ($0.10/oz), 100 oz per lot;
  - ``XAGUSD``: 3 digits, point 0.001, **pip 0.01** ($0.01/oz), 5,000 oz per lot.

  With a pip of 0.01 on gold, the default 5-pip slippage alert would mean 5 cents (less
  than gold's usual spread) and would fire on almost every fill.  Brokers that count a
  gold pip as 0.01 can say so in a user entry.
* Contract size: 100,000 units of the base currency per FX lot (``fx_contract_size``
  changes it for every built-in FX pair), 100 oz for gold, 5,000 oz for silver.

A :class:`SymbolTable` is the built-ins plus user entries, from a dict, a JSON file, or the
JSON file named by the environment variable ``EXECUTION_SYMBOLS_FILE``.  A user entry for a
known symbol is merged over the built-in (``{"EURUSD": {"contract_size": 10000}}``); a new
symbol needs ``digits`` and, for metals (base XAU/XAG/XPT/XPD), ``pip_size`` and
``contract_size``.  The JSON file is either the mapping ``{symbol: entry}`` itself or
``{"symbols": {symbol: entry}, "fx_contract_size": 100000}``.

Looking up an unknown symbol raises :class:`UnknownSymbol`: bad input, to be dead-lettered.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.models import SYMBOL_RE, describe_validation_error

#: Environment variable naming a JSON file of user symbol entries.
ENV_VAR = "EXECUTION_SYMBOLS_FILE"
#: Units of the base currency in one standard FX lot.
DEFAULT_FX_CONTRACT_SIZE = 100_000.0
#: ISO 4217 codes of precious metals: such symbols must state pip size and contract size.
METAL_CODES = frozenset({"XAU", "XAG", "XPT", "XPD"})


class UnknownSymbol(KeyError, ValueError):
    """A symbol the table does not know: bad input (a ``KeyError`` and a ``ValueError``)."""

    def __init__(self, symbol: str, known: int = 0) -> None:
        super().__init__(symbol)
        self.symbol = symbol
        self.known = known

    def __str__(self) -> str:
        return (
            f"unknown symbol {self.symbol!r}: not in the symbol table ({self.known} symbols); "
            f"add it with a user entry (dict, or the JSON file named by ${ENV_VAR})"
        )


class SymbolConfigError(ValueError):
    """A user symbol entry or symbols file that is not valid."""


def _default_pip(digits: int, point: float) -> float | None:
    if digits in (3, 5):
        return round(point * 10, digits)
    if digits in (2, 4):
        return point
    return None


class SymbolSpec(BaseModel):
    """One symbol's trading facts.  ``point``, ``pip_size`` and ``quote_currency`` are
    derived from ``digits`` and the name when not given."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    symbol: str
    digits: int = Field(ge=0, le=8)
    point: float = Field(gt=0)
    pip_size: float = Field(gt=0)
    contract_size: float = Field(gt=0)
    quote_currency: str = Field(pattern=r"^[A-Z]{3}$")
    #: The broker expires pending orders of this symbol itself (MT5 SYMBOL_EXPIRATION_MODE
    #: allows DAY and SPECIFIED).  False: orders go GTC and the service expires them.
    broker_expiry: bool = True

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        d = dict(data)
        symbol, digits = d.get("symbol"), d.get("digits")
        if not isinstance(symbol, str) or not SYMBOL_RE.match(symbol):
            raise ValueError(f"symbol must be six upper-case letters, e.g. EURUSD, got {symbol!r}")
        base = symbol[:3]
        if isinstance(digits, int) and not isinstance(digits, bool) and 0 <= digits <= 8:
            if d.get("point") is None:
                d["point"] = round(10.0**-digits, digits)
            if d.get("pip_size") is None:
                if base in METAL_CODES:
                    raise ValueError(f"{symbol}: metals have no standard pip, pip_size must be given")
                pip = _default_pip(digits, d["point"])
                if pip is None:
                    raise ValueError(f"{symbol}: no default pip for {digits}-digit quotes, pip_size must be given")
                d["pip_size"] = pip
        if d.get("contract_size") is None:
            if base in METAL_CODES:
                raise ValueError(f"{symbol}: contract_size must be given for a metal")
            d["contract_size"] = DEFAULT_FX_CONTRACT_SIZE
        d.setdefault("quote_currency", symbol[3:])
        return d

    @model_validator(mode="after")
    def _consistent(self) -> "SymbolSpec":
        if not math.isclose(self.point, 10.0**-self.digits, rel_tol=1e-9):
            raise ValueError(f"{self.symbol}: point {self.point} does not match {self.digits} digits")
        ratio = self.pip_size / self.point
        if ratio < 1 - 1e-9 or not math.isclose(ratio, round(ratio), rel_tol=1e-9):
            raise ValueError(f"{self.symbol}: pip_size {self.pip_size} is not a whole number of points {self.point}")
        return self

    @property
    def points_per_pip(self) -> int:
        """Points in one pip: 10 for fractional-pip quotes, 1 otherwise."""
        return round(self.pip_size / self.point)

    def pips(self, price_difference: float) -> float:
        """A price difference in pips (unrounded)."""
        return price_difference / self.pip_size

    def pips_to_points(self, pips: float) -> int:
        """Pips as whole points, e.g. for MT5's ``deviation``."""
        return round(pips * self.points_per_pip)

    def round_price(self, price: float) -> float:
        """A price rounded to the quote's digits."""
        return round(price, self.digits)


def _fx(symbol: str, digits: int) -> dict[str, Any]:
    return {"symbol": symbol, "digits": digits}


#: Built-in entries: the FX majors and crosses, gold and silver.
BUILTIN: Mapping[str, Mapping[str, Any]] = {
    **{s: _fx(s, 5) for s in ("EURUSD", "GBPUSD", "AUDUSD", "NZDUSD", "USDCHF", "USDCAD", "EURGBP", "EURCHF")},
    **{s: _fx(s, 3) for s in ("USDJPY", "EURJPY", "GBPJPY", "AUDJPY")},
    "XAUUSD": {"symbol": "XAUUSD", "digits": 2, "pip_size": 0.1, "contract_size": 100.0},
    # Silver: many brokers take no expiration on metals; the service expires them itself.
    "XAGUSD": {"symbol": "XAGUSD", "digits": 3, "pip_size": 0.01, "contract_size": 5_000.0, "broker_expiry": False},
}


def _merge(base: Mapping[str, Any] | None, symbol: str, entry: Any) -> dict[str, Any]:
    if isinstance(entry, SymbolSpec):
        entry = entry.model_dump()
    if not isinstance(entry, Mapping):
        raise SymbolConfigError(f"{symbol}: an entry must be an object, got {type(entry).__name__}")
    given = dict(entry)
    if given.setdefault("symbol", symbol) != symbol:
        raise SymbolConfigError(f"{symbol}: entry names another symbol {given['symbol']!r}")
    merged = dict(base or {})
    if "digits" in given and given["digits"] != merged.get("digits"):
        # New digits: point and (default) pip size must be derived again unless given.
        merged.pop("point", None)
        merged.pop("pip_size", None)
    merged.update(given)
    return merged


class SymbolTable(Mapping[str, SymbolSpec]):
    """The built-in symbols plus user entries; ``table[symbol]`` raises :class:`UnknownSymbol`.

    ``entries`` maps a symbol to a :class:`SymbolSpec` or a dict of its fields; a dict for a
    known symbol is merged over it.  ``fx_contract_size`` sets the lot size of the built-in
    FX pairs (and the default for new user FX symbols).  ``defaults=False`` starts empty.
    """

    def __init__(
        self,
        entries: Mapping[str, Any] | None = None,
        *,
        defaults: bool = True,
        fx_contract_size: float = DEFAULT_FX_CONTRACT_SIZE,
    ) -> None:
        if not (math.isfinite(fx_contract_size) and fx_contract_size > 0):
            raise SymbolConfigError(f"fx_contract_size must be a positive number, got {fx_contract_size}")
        raw: dict[str, dict[str, Any]] = {}
        if defaults:
            for s, e in BUILTIN.items():
                raw[s] = dict(e)
                if s[:3] not in METAL_CODES:
                    raw[s]["contract_size"] = float(fx_contract_size)
        for symbol, entry in (entries or {}).items():
            if not isinstance(symbol, str):
                raise SymbolConfigError(f"symbol keys must be strings, got {symbol!r}")
            merged = _merge(raw.get(symbol), symbol, entry)
            if symbol not in raw and symbol[:3] not in METAL_CODES:
                merged.setdefault("contract_size", float(fx_contract_size))
            raw[symbol] = merged
        specs: dict[str, SymbolSpec] = {}
        for symbol, fields in raw.items():
            try:
                specs[symbol] = SymbolSpec.model_validate(fields)
            except ValidationError as exc:
                reason, _ = describe_validation_error(exc)
                raise SymbolConfigError(f"symbol entry {symbol}: {reason}") from None
        self._specs = specs
        self.fx_contract_size = float(fx_contract_size)

    # --- construction -------------------------------------------------------------------

    @staticmethod
    def read_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], float | None]:
        """The entries of a JSON symbols file, and its ``fx_contract_size`` if it has one."""
        p = Path(path)
        try:
            doc = orjson.loads(p.read_bytes())
        except OSError as exc:
            raise SymbolConfigError(f"symbols file {p}: {exc.strerror or exc}") from None
        except orjson.JSONDecodeError as exc:
            raise SymbolConfigError(f"symbols file {p}: malformed JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise SymbolConfigError(f"symbols file {p}: expected a JSON object")
        fx_size = None
        if "symbols" in doc:
            unknown = set(doc) - {"symbols", "fx_contract_size"}
            if unknown:
                raise SymbolConfigError(f"symbols file {p}: unknown keys {sorted(unknown)}")
            fx_size = doc.get("fx_contract_size")
            if fx_size is not None and (isinstance(fx_size, bool) or not isinstance(fx_size, (int, float))):
                raise SymbolConfigError(f"symbols file {p}: fx_contract_size must be a number")
            doc = doc["symbols"]
            if not isinstance(doc, dict):
                raise SymbolConfigError(f"symbols file {p}: 'symbols' must be an object")
        return doc, (float(fx_size) if fx_size is not None else None)

    @classmethod
    def load(
        cls,
        entries: Mapping[str, Any] | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        fx_contract_size: float | None = None,
    ) -> "SymbolTable":
        """Built-ins, then the file named by ``$EXECUTION_SYMBOLS_FILE``, then ``path``, then
        ``entries`` (later entries merge over earlier ones).  An explicit ``fx_contract_size``
        wins over a file's."""
        env = os.environ if environ is None else environ
        merged: dict[str, Any] = {}
        fx_size = None
        for source in (env.get(ENV_VAR) or None, path):
            if source is None:
                continue
            file_entries, file_fx = cls.read_file(source)
            fx_size = file_fx if file_fx is not None else fx_size
            for s, e in file_entries.items():
                merged[s] = _merge(merged.get(s), s, e) if s in merged else e
        for s, e in (entries or {}).items():
            merged[s] = _merge(merged.get(s), s, e) if s in merged else e
        size = fx_contract_size if fx_contract_size is not None else fx_size
        return cls(merged, fx_contract_size=size if size is not None else DEFAULT_FX_CONTRACT_SIZE)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kw: Any) -> "SymbolTable":
        """Built-ins plus the entries of a JSON file."""
        return cls.load(path=path, environ={}, **kw)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kw: Any) -> "SymbolTable":
        """Built-ins plus the file named by ``$EXECUTION_SYMBOLS_FILE`` (if set)."""
        return cls.load(environ=environ, **kw)

    # --- lookup -------------------------------------------------------------------------

    def __getitem__(self, symbol: str) -> SymbolSpec:
        try:
            return self._specs[symbol]
        except (KeyError, TypeError):
            raise UnknownSymbol(str(symbol), len(self._specs)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, symbol: object) -> bool:
        return isinstance(symbol, str) and symbol in self._specs

    def __repr__(self) -> str:
        return f"SymbolTable({len(self._specs)} symbols)"

    def spec(self, symbol: str) -> SymbolSpec:
        """The symbol's spec; :class:`UnknownSymbol` if unknown (``get`` returns None)."""
        return self[symbol]

    def pip_size(self, symbol: str) -> float:
        return self[symbol].pip_size

    def contract_size(self, symbol: str) -> float:
        return self[symbol].contract_size


#: The built-in table (no user entries).
DEFAULT_SYMBOLS = SymbolTable()
