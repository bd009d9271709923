"""read_json on answers that ended early (issue #19): whole items count, nothing is guessed."""

import pytest

from shim.usage import read_json


def collect(body: bytes) -> tuple[list[dict], str | None]:
    seen: list[dict] = []
    return seen, read_json(body, seen.append)


@pytest.mark.parametrize("cut", [1, 5, 17, 30])
def test_a_cut_json_array_gives_its_whole_items_and_no_more(cut):
    items = [b'{"n":%d,"usageMetadata":{"promptTokenCount":7}}' % i for i in range(3)]
    whole = b"[" + b",\r\n".join(items) + b"]"
    body = whole[: whole.index(items[2]) + cut]  # the third item arrives only in part
    seen, unread = collect(body)
    assert [item["n"] for item in seen] == [0, 1]
    assert unread is None


def test_an_array_cut_before_its_first_whole_item_is_unparsable():
    assert collect(b'[{"usageMetadata":{"promptTok')[1] == "unparsable"


def test_a_cut_object_is_unparsable_not_salvaged():
    assert collect(b'{"usage":{"input_tokens":3},"content":[{"te')[1] == "unparsable"


def test_garbage_before_the_array_is_unparsable():
    assert collect(b'xx[{"usage":1}]')[1] == "unparsable"
