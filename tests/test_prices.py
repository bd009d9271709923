"""shim.prices: the shipped table is valid data, lookup is by longest prefix, bad files say why."""

from __future__ import annotations

import json

import pytest

from shim import prices
from shim.settings import ConfigError, report_settings


def test_every_shipped_entry_has_a_date_and_a_source():
    shipped = prices.load(prices.SHIPPED)
    assert len(shipped) >= 10
    assert all(p.as_of and p.source.startswith("https://") for p in shipped.values())


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4"),
        ("claude-opus-4-1-20250805", "claude-opus-4"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("gemini-2.5-flash-lite", "gemini-2.5-flash-lite"),
        ("gemini-2.5-flash", "gemini-2.5-flash"),
        ("models/gemini-2.5-pro", "gemini-2.5-pro"),
        ("claude-opus-40", None),  # a prefix must end at a name boundary
        ("gpt-5", None),
        (None, None),
    ],
)
def test_longest_prefix_wins(model, family):
    found = prices.table().find(model)
    assert (found.family if found else None) == family


def test_an_override_replaces_and_extends(tmp_path):
    path = tmp_path / "p.json"
    entry = {"input": 1, "output": 2, "as_of": "2026-01-01", "source": "contract"}
    path.write_text(json.dumps({"families": {"claude-sonnet-4": entry, "llama": entry}}))
    table = prices.table(path)
    assert table.find("claude-sonnet-4-5").input == 1.0
    assert table.find("llama-3").family == "llama"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ([], "families"),
        ({"families": {"x": {"input": 1, "output": 2, "source": "s"}}}, "'as_of'"),
        (
            {"families": {"x": {"input": -1, "output": 2, "as_of": "2026-01-01", "source": "s"}}},
            "'input'",
        ),
        ({"families": {"x": {"output": 2, "as_of": "2026-01-01", "source": "s"}}}, "'input'"),
        ({"families": {"x": {"input": 1, "output": 2, "as_of": "2026-01-01"}}}, "'source'"),
        (
            {
                "families": {
                    "x": {"input": 1, "output": 2, "as_of": "2026-01-01", "source": "s", "inptu": 3}
                }
            },
            "unknown keys",
        ),
    ],
)
def test_a_bad_price_file_names_the_family_and_key(tmp_path, data, says):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(prices.PriceFileError, match=says):
        prices.load(path)


def test_settings_validate_the_price_file_at_start(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError) as info:
        report_settings({"SHIM_PRICES_FILE": str(path), "SHIM_SUBSCRIPTION_USD_MONTH": "lots"})
    problems = info.value.problems
    assert problems[0].startswith("SHIM_PRICES_FILE: ") and "not JSON" in problems[0]
    assert problems[1].startswith("SHIM_SUBSCRIPTION_USD_MONTH: expected an amount in USD")


def test_report_settings_default_to_none():
    assert report_settings({}) == {"prices_file": None, "subscription_usd_month": None}
