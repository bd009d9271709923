"""load_keys parses key lists; KeyPool hands keys out in turn and names them by a safe id."""

from __future__ import annotations

import hashlib
import re

import pytest

from shim.gemini_keys import MAX_BENCHED_MODELS, KeyPool
from shim.keys import KeyFileError, load_keys
from shim.secret_files import key_id
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


# --- benches per key and per (key, model) -----------------------------------------------------


def clocked_pool(keys=("k1", "k2", "k3")) -> tuple[KeyPool, list[float]]:
    now = [1_000.0]
    return KeyPool(keys, clock=lambda: now[0]), now


def test_a_model_bench_skips_the_key_for_that_model_only():
    pool, _ = clocked_pool()
    pool.cool_down(pool.id_of("k1"), 30, "gemini-2.5-pro")
    assert [pool.next_key("gemini-2.5-pro") for _ in range(4)] == ["k2", "k3", "k2", "k3"]
    assert [pool.next_key("gemini-2.5-flash") for _ in range(3)] == ["k1", "k2", "k3"]
    assert pool.next_key() == "k1"  # a call without a model (GET /models) too


def test_a_model_bench_ends_on_time():
    pool, now = clocked_pool(("k1",))
    pool.cool_down(pool.id_of("k1"), 30, "gemini-2.5-pro")
    assert pool.next_key("gemini-2.5-pro") is None
    assert pool.seconds_until_available("gemini-2.5-pro") == pytest.approx(30)
    assert pool.seconds_until_available("gemini-2.5-flash") == 0.0
    now[0] += 30.5
    assert pool.next_key("gemini-2.5-pro") == "k1"


def test_a_whole_key_bench_covers_every_model():
    pool, _ = clocked_pool(("k1", "k2"))
    pool.cool_down(pool.id_of("k1"), 30)
    assert {pool.next_key("gemini-2.5-flash") for _ in range(4)} == {"k2"}
    assert {pool.next_key() for _ in range(4)} == {"k2"}


def test_wait_for_a_model_is_the_soonest_key_free_for_it():
    pool, _ = clocked_pool(("k1", "k2"))
    pool.cool_down(pool.id_of("k1"), 100, "gemini-2.5-pro")
    pool.cool_down(pool.id_of("k2"), 50)  # whole key
    pool.cool_down(pool.id_of("k2"), 80, "gemini-2.5-pro")
    assert pool.next_key("gemini-2.5-pro") is None
    assert pool.seconds_until_available("gemini-2.5-pro") == pytest.approx(80)
    assert pool.next_key("gemini-2.5-flash") == "k1"


def test_counts_and_benches_say_which_key_is_benched_for_what():
    pool, _ = clocked_pool()
    pool.cool_down(pool.id_of("k1"), 30.2, "gemini-2.5-pro")
    pool.cool_down(pool.id_of("k2"), 10)
    assert pool.states() == {"available": 2, "cooling": 1, "disabled": 0}
    assert pool.counts() == {"available": 2, "cooling": 1, "disabled": 0, "model_benched": 1}
    assert pool.benches() == [
        {"state": "available", "benched_models": {"gemini-2.5-pro": 31}},
        {"state": "cooling", "benched_models": {}},
        {"state": "available", "benched_models": {}},
    ]


def test_the_number_of_models_benched_at_once_is_bounded():
    pool, now = clocked_pool(("k1",))
    ident = pool.id_of("k1")
    for n in range(MAX_BENCHED_MODELS):
        assert pool.cool_down(ident, 30, f"model-{n}")
    # One more invented model is not benched: the key stays in use for it.
    assert not pool.cool_down(ident, 30, "one-model-too-many")
    assert pool.next_key("one-model-too-many") == "k1"
    assert pool.cool_down(ident, 60, "model-0")  # a model already benched can be again
    now[0] += 31  # the others are over: room again
    assert pool.cool_down(ident, 30, "one-model-too-many")
    assert pool.next_key("one-model-too-many") is None
