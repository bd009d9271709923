"""load_keys parses key lists; KeyPool hands keys out in turn and names them by a safe id."""

from __future__ import annotations

import hashlib
import re

import pytest

from shim.keys import KeyFileError, KeyPool, key_id, load_keys
from tests.fake_upstream import FAKE_GEMINI_KEYS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k1", ("k1",)),
        ("k1\nk2\n", ("k1", "k2")),
        ("# a comment\nk1\n", ("k1",)),
        ("k1  # trailing comment\nk2#tight\n", ("k1", "k2")),
        ("\n\n  k1  \n\t\n\nk2\n\n", ("k1", "k2")),
        ("\tk1\t\n   k2   \n", ("k1", "k2")),
        ("k2\nk1\nk2\nk1\nk3\n", ("k2", "k1", "k3")),
        ("k1\r\nk2\r\n", ("k1", "k2")),
        ("   # indented comment\nk1", ("k1",)),
    ],
)
def test_load_keys_from_text(text, expected):
    assert load_keys(text=text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k1\nk2\n", ("k1", "k2")),
        ("# header\n\nk1  # primary\nk1\n  k2\n", ("k1", "k2")),
    ],
)
def test_load_keys_from_file(tmp_path, text, expected):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    assert load_keys(path=str(path)) == expected


@pytest.mark.parametrize(
    "text", ["", "\n\n", "   \n\t\n", "# only a comment\n  # another\n", "#k1"]
)
def test_no_keys_is_an_error(text):
    with pytest.raises(KeyFileError, match="no keys found"):
        load_keys(text=text)


def test_file_without_keys_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing\n")
    with pytest.raises(KeyFileError, match="empty.txt"):
        load_keys(path=str(path))


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("AIzaGood\nAIza bad-key-XYZ\n", "AIza bad-key-XYZ"),
        ("AIza-k\u00e9y-non-ascii\n", "AIza-k\u00e9y-non-ascii"),
        ("AIza\tbad-key-TAB\n", "AIza\tbad-key-TAB"),
        ("AIza\u00a0bad-key-NBSP\n", "AIza\u00a0bad-key-NBSP"),
    ],
)
def test_bad_key_is_an_error_that_does_not_contain_it(text, bad):
    with pytest.raises(KeyFileError) as info:
        load_keys(text=text)
    message = str(info.value)
    assert bad not in message
    for part in bad.split():
        assert part not in message
    assert "AIzaGood" not in message


def test_bad_key_in_file_names_the_line_not_the_key(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# header\nAIzaGood\nAIza bad-key-XYZ\n")
    with pytest.raises(KeyFileError) as info:
        load_keys(path=str(path))
    assert "line 3" in str(info.value)
    assert "bad-key-XYZ" not in str(info.value)


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(KeyFileError, match="nope.txt"):
        load_keys(path=str(tmp_path / "nope.txt"))


def test_file_not_utf8_is_an_error_without_its_bytes(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_bytes(b"AIzaSecretBytes\xff\xfe\n")
    with pytest.raises(KeyFileError) as info:
        load_keys(path=str(path))
    assert "AIzaSecretBytes" not in str(info.value)


def test_load_keys_needs_path_or_text():
    with pytest.raises(ValueError):
        load_keys()


# --- KeyPool ---------------------------------------------------------------------------------


def test_pool_hands_keys_out_round_robin():
    pool = KeyPool(("k1", "k2", "k3"))
    assert [pool.next_key() for _ in range(7)] == ["k1", "k2", "k3", "k1", "k2", "k3", "k1"]


def test_pool_of_one_always_hands_out_that_key():
    pool = KeyPool(("only",))
    assert [pool.next_key() for _ in range(3)] == ["only", "only", "only"]


def test_empty_pool_returns_none():
    pool = KeyPool(())
    assert [pool.next_key() for _ in range(2)] == [None, None]


@pytest.mark.parametrize(("keys", "size"), [((), 0), (("k1",), 1), (FAKE_GEMINI_KEYS, 3)])
def test_pool_length_is_number_of_keys(keys, size):
    assert len(KeyPool(keys)) == size


@pytest.mark.parametrize("key", FAKE_GEMINI_KEYS)
def test_key_id_is_eight_hex_chars(key):
    assert re.fullmatch(r"[0-9a-f]{8}", key_id(key))


@pytest.mark.parametrize("key", FAKE_GEMINI_KEYS)
def test_key_id_is_stable(key):
    assert key_id(key) == key_id(str(key)) == hashlib.sha256(key.encode()).hexdigest()[:8]


def test_key_id_differs_per_key():
    assert len({key_id(key) for key in FAKE_GEMINI_KEYS}) == len(FAKE_GEMINI_KEYS)


@pytest.mark.parametrize("key", FAKE_GEMINI_KEYS)
def test_pool_id_of_matches_key_id(key):
    assert KeyPool(FAKE_GEMINI_KEYS).id_of(key) == key_id(key)


def test_pool_repr_contains_no_key():
    text = repr(KeyPool(FAKE_GEMINI_KEYS))
    for key in FAKE_GEMINI_KEYS:
        assert key not in text
    assert all(key_id(key) in text for key in FAKE_GEMINI_KEYS)
