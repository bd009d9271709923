"""The docs tell the truth: every setting documented, the test command the one CI runs."""

from __future__ import annotations

import re

from shim.settings import table
from tests.conftest import ROOT

VARIABLES = sorted(row.variable for row in table())
README = (ROOT / "README.md").read_text()


def test_settings_read_the_documented_variables():
    assert len(VARIABLES) >= 14


def test_every_variable_the_settings_modules_name_is_in_the_table():
    # A rule after the table may read a variable by name: it must still be a table row.
    named = set()
    for module in ("settings.py", "parsers.py"):
        named |= set(re.findall(r'"(SHIM_[A-Z0-9_]+)"', (ROOT / "shim" / module).read_text()))
    assert named <= set(VARIABLES), named - set(VARIABLES)


def test_every_setting_is_in_the_readme_table():
    table_rows = {m for m in re.findall(r"^\| `(SHIM_[A-Z0-9_]+)`", README, re.M)}
    assert set(VARIABLES) <= table_rows, set(VARIABLES) - table_rows


def shown(default: object) -> str:
    """A table default as the README's default column writes it."""
    if default is None or default == ():
        return "—"
    if isinstance(default, bool) or (isinstance(default, float) and default.is_integer()):
        return f"`{int(default)}`"
    if isinstance(default, tuple):
        return f"`{','.join(default)}`"
    return f"`{default}`"


def test_the_readme_states_each_tables_default():
    cells = dict(re.findall(r"^\| `(SHIM_[A-Z0-9_]+)` \| ([^|]*) \|", README, re.M))
    # Required unless SHIM_CLIENTS_FILE is set (a rule), and the number of cores (computed).
    stated = [row for row in table() if row.variable not in ("SHIM_SHARED_SECRET", "SHIM_WORKERS")]
    pairs = {row.variable: (cells[row.variable], shown(row.default)) for row in stated}
    assert {name: pair for name, pair in pairs.items() if pair[0] != pair[1]} == {}


def test_every_setting_is_in_env_example():
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^(SHIM_[A-Z0-9_]+)=", example, re.M))
    assert set(VARIABLES) <= listed, set(VARIABLES) - listed


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^\./scripts/test$", ci, re.M)
    assert command, "CI must run ./scripts/test"
    assert re.search(r"^\./scripts/test$", README, re.M)


def test_readme_starts_with_the_two_setup_commands():
    head = README[:1500]
    assert "./scripts/serve" in head and "./scripts/test" in head
