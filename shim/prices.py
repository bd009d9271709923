"""API list prices as data: load, validate and look up the price of a model (issue #17, item 3).

The shipped table is ``shim/prices.json``: per model family (a model-name prefix), USD per
million tokens for input, output, cache read and cache write, each entry with the date it
was taken (``as_of``) and where from (``source``). They are list prices as of that date and
may be out of date; ``SHIM_PRICES_FILE`` names a JSON file of the same shape whose entries
replace or extend the shipped ones. Lookup is by prefix, longest first, at a name boundary;
a model no prefix matches has no price, and the report says so instead of guessing.

What lives here is the table and its rules; what a call cost is summed in ``shim.report``.
Standard library only: shim.parsers validates SHIM_PRICES_FILE with ``load`` in gunicorn's
master (see shim.settings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SHIPPED = Path(__file__).with_name("prices.json")
KINDS = ("input", "output", "cache_read", "cache_write")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_BOUNDARY = "-@:._/"  # what may follow a family prefix in a model name


class PriceFileError(ValueError):
    """A price file that is not JSON of the documented shape."""


@dataclass(frozen=True)
class LongContext:
    """Prices for a call whose prompt is above ``above_input_tokens`` (Gemini's >200k tier)."""

    above_input_tokens: int
    input: float
    output: float
    cache_read: float | None


@dataclass(frozen=True)
class Price:
    """One family's USD per million tokens; None: the provider has no such per-token price."""

    family: str
    input: float
    output: float
    cache_read: float | None
    cache_write: float | None
    as_of: str
    source: str
    # Gemini's promptTokenCount counts the cached tokens too: bill only the rest as input.
    input_includes_cache_read: bool = False
    long_context: LongContext | None = None


class PriceTable:
    """Families by prefix; ``find`` gives the longest prefix of a model name, or None."""

    def __init__(self, prices: Mapping[str, Price]):
        self.prices = dict(prices)
        self._order = sorted(self.prices, key=len, reverse=True)

    def find(self, model: str | None) -> Price | None:
        if not model:
            return None
        name = model.lower().removeprefix("models/")
        for family in self._order:
            if name.startswith(family) and (
                len(name) == len(family) or name[len(family)] in _BOUNDARY
            ):
                return self.prices[family]
        return None


def load(path: str | Path) -> dict[str, Price]:
    """The families in a price file, validated; PriceFileError says what is wrong and where."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PriceFileError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PriceFileError(f"{str(path)!r} is not JSON: {exc}") from None
    return parse(data)


def parse(data: object) -> dict[str, Price]:
    if not isinstance(data, dict) or not isinstance(data.get("families"), dict):
        raise PriceFileError('expected a JSON object {"families": {"<model prefix>": {...}}}')
    return {
        str(family).lower(): _price(str(family).lower(), entry)
        for family, entry in data["families"].items()
    }


def table(override: str | Path | None = None) -> PriceTable:
    """The shipped prices, with an override file's families replacing or adding to them."""
    prices = load(SHIPPED)
    if override:
        prices.update(load(override))
    return PriceTable(prices)


def _price(family: str, entry: object) -> Price:
    where = f"family {family!r}"
    if not family or not isinstance(entry, dict):
        raise PriceFileError(f"{where}: expected an object of prices, as_of and source")
    unknown = set(entry) - {*KINDS, "as_of", "source", "input_includes_cache_read", "long_context"}
    if unknown:
        raise PriceFileError(f"{where}: unknown keys {sorted(unknown)}")
    as_of, source = entry.get("as_of"), entry.get("source")
    if not isinstance(as_of, str) or not _DATE.fullmatch(as_of):
        raise PriceFileError(f"{where}: 'as_of' expected a date YYYY-MM-DD, got {as_of!r}")
    if not isinstance(source, str) or not source.strip():
        raise PriceFileError(f"{where}: 'source' expected where the prices were taken from")
    includes = entry.get("input_includes_cache_read", False)
    if not isinstance(includes, bool):
        raise PriceFileError(f"{where}: 'input_includes_cache_read' expected true or false")
    long = entry.get("long_context")
    return Price(
        family=family,
        input=_usd(where, entry, "input", required=True),
        output=_usd(where, entry, "output", required=True),
        cache_read=_usd(where, entry, "cache_read"),
        cache_write=_usd(where, entry, "cache_write"),
        as_of=as_of,
        source=source,
        input_includes_cache_read=includes,
        long_context=None if long is None else _long_context(where, long),
    )


def _long_context(where: str, entry: object) -> LongContext:
    where = f"{where} long_context"
    if not isinstance(entry, dict):
        raise PriceFileError(f"{where}: expected an object")
    above = entry.get("above_input_tokens")
    if isinstance(above, bool) or not isinstance(above, int) or above < 1:
        raise PriceFileError(f"{where}: 'above_input_tokens' expected a positive integer")
    return LongContext(
        above_input_tokens=above,
        input=_usd(where, entry, "input", required=True),
        output=_usd(where, entry, "output", required=True),
        cache_read=_usd(where, entry, "cache_read"),
    )


def _usd(where: str, entry: dict, kind: str, *, required: bool = False) -> float | None:
    value = entry.get(kind)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 10_000:
        raise PriceFileError(
            f"{where}: {kind!r} expected USD per million tokens (a number >= 0), got {value!r}"
        )
    return float(value)
