"""Subscription refusals and quota headers, pure: bodies and headers in, kinds and fields out."""

from __future__ import annotations

import json
import logging

import pytest
from urllib3 import HTTPHeaderDict

from shim import quota, refusals
from shim.access import AccessRecord
from tests.fake_upstream import REFUSALS, Encoder

EXPECTED = {
    "third_party_extra_usage": "third_party_extra_usage",
    "third_party_org": "third_party_extra_usage",
    "claude_code_only": "claude_code_only",
    "org_disabled": "org_disabled",
    "oauth_not_allowed": "oauth_not_allowed",
    "oauth_not_supported": "oauth_not_supported",
}


def refusal_body(name: str) -> bytes:
    status, kind, message = REFUSALS[name]
    return json.dumps(
        {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"}
    ).encode()


@pytest.mark.parametrize("coding", [None, "gzip", "br", "zstd", "deflate"])
@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_each_refusal_text_is_classified_whatever_the_coding(name, coding):
    body = refusal_body(name)
    sent = Encoder(coding).whole(body) if coding else body
    assert refusals.classify(sent, coding) == EXPECTED[name]


@pytest.mark.parametrize(
    "body, coding",
    [
        (b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: x"}}',
         None),
        (b'{"type":"error","error":{"type":"rate_limit_error","message":"Slow down"}}', "gzip"),
        (b"not json at all", None),
        (b'{"error": "invalid_grant"}', None),
        (b'["This organization has been disabled."]', None),
        (b"\x1f\x8b garbage", "gzip"),  # corrupt gzip: not classified, no exception
        (refusal_body("org_disabled"), "compress"),  # a coding shim cannot decode
    ],
)
def test_other_errors_are_not_refusals(body, coding):
    assert refusals.classify(body, coding) is None


def test_a_decompression_bomb_is_not_decoded_past_the_bound():
    bomb = Encoder("gzip").whole(b'{"error":{"message":"' + b"A" * 5_000_000 + b'"}}')
    assert len(bomb) < refusals.MAX_ERROR_BYTES
    assert refusals.classify(bomb, "gzip") is None


def test_blocking_kinds_are_the_ones_that_serve_no_one():
    assert refusals.BLOCKING == {"org_disabled", "oauth_not_allowed"}
    assert set(EXPECTED.values()) == set(refusals.KINDS)


ALL_HEADERS = {
    "anthropic-ratelimit-unified-status": "allowed_warning",
    "anthropic-ratelimit-unified-reset": "1785182400",
    "anthropic-ratelimit-unified-representative-claim": "seven_day",
    "anthropic-ratelimit-unified-5h-utilization": "0.42",
    "anthropic-ratelimit-unified-7d-utilization": "1.07",
    "anthropic-ratelimit-unified-5h-reset": "1785182400",
    "anthropic-ratelimit-unified-7d-reset": "1785751200",
    "anthropic-ratelimit-unified-overage-status": "rejected",
    "anthropic-ratelimit-unified-overage-disabled-reason": "org_level_disabled",
    "anthropic-ratelimit-unified-fallback": "available",
    "anthropic-ratelimit-unified-fallback-percentage": "0.5",
}


def record_with(headers: dict[str, str]) -> AccessRecord:
    record = AccessRecord("req", "anthropic", "POST")
    quota.read(HTTPHeaderDict(headers), record)
    return record


def test_every_unified_header_lands_on_the_record():
    fields = record_with(ALL_HEADERS).fields()
    assert fields["quota_status"] == "allowed_warning"
    assert fields["quota_reset"] == "1785182400"
    assert fields["quota_representative_claim"] == "seven_day"
    assert fields["quota_5h_utilization"] == 0.42
    assert fields["quota_7d_utilization"] == 1.07  # above 1 is kept as sent
    assert fields["quota_5h_reset"] == "1785182400"
    assert fields["quota_7d_reset"] == "1785751200"
    assert fields["quota_overage_status"] == "rejected"
    assert fields["quota_overage_disabled_reason"] == "org_level_disabled"
    assert fields["quota_fallback"] == "available"
    assert fields["quota_fallback_percentage"] == 0.5


def test_api_key_traffic_and_odd_values_leave_the_fields_empty():
    assert record_with({"anthropic-ratelimit-unified-5h-utilization": "0.9"}).fields()[
        "quota_5h_utilization"
    ] is None  # no status header: not subscription traffic
    odd = record_with(
        {
            "anthropic-ratelimit-unified-status": "allowed",
            "anthropic-ratelimit-unified-5h-utilization": "lots",
            "anthropic-ratelimit-unified-overage-status": "x" * 500,
        }
    ).fields()
    assert odd["quota_5h_utilization"] is None and odd["quota_overage_status"] is None


def test_quota_watch_writes_on_change_only_and_warns_once_per_crossing(caplog):
    writes = []
    watch = quota.QuotaWatch(lambda previous, current: writes.append(previous), refresh_s=3600)
    base = {"anthropic-ratelimit-unified-status": "allowed",
            "anthropic-ratelimit-unified-representative-claim": "five_hour"}
    with caplog.at_level(logging.WARNING, logger="shim.quota"):
        for used in ("0.5", "0.5", "0.85", "0.85", "0.9", "0.9", "0.7", "0.81"):
            watch.seen(record_with({**base, "anthropic-ratelimit-unified-5h-utilization": used}))
        watch.seen(record_with({**base, "anthropic-ratelimit-unified-status": "rejected"}))
        watch.seen(record_with({**base, "anthropic-ratelimit-unified-status": "rejected"}))
    assert len(writes) == 6  # 0.5, 0.85, 0.9, 0.7, 0.81, rejected
    warnings = [(r.window, r.value) for r in caplog.records if r.event == "quota_warning"]
    assert warnings == [("5h", 0.85), ("5h", 0.81), ("five_hour", "rejected")]


def test_quota_watch_rewrites_every_gauge_after_refresh_s():
    writes = []
    watch = quota.QuotaWatch(lambda previous, current: writes.append(previous), refresh_s=0)
    record = record_with({"anthropic-ratelimit-unified-status": "allowed"})
    watch.seen(record)
    watch.seen(record)
    assert writes == [None, None]  # unchanged, but due: all gauges again
