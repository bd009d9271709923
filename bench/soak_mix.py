"""The soak's call mix: what a Claude Code-like session and an SDK-like call send, faults included.

``Mix`` only builds ``Call`` values, all from one seeded random source; running them is
soak_wire.py's, and the rate they are sent at is the plan's (soak.py's ``load``).
"""

from __future__ import annotations

import json
import random

from soak_plan import HTTP_TIMEOUT_S, Plan, secret_of
from soak_wire import Call

# Claude Code's Accept-Encoding, the SDKs' (httpx), and none; the coding the real APIs pick.
OFFERS = (("gzip, deflate, br, zstd", 5), ("gzip, deflate", 4), ("identity", 1))
JSON_PICK = ("br", "gzip", "zstd", "deflate")
STREAM_PICK = ("gzip", "br", "zstd", "deflate")
ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"


class Mix:
    """Builds calls: a fixed mix, faults at low rates, all from one seeded random source."""

    def __init__(self, plan: Plan, prefix: str = "soak", seed: int = 19):
        self.plan = plan
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.serial = 0
        self.bad_sources = [f"127.0.0.{n}" for n in range(2, 250)]

    def _id(self, kind: str, coding: str) -> str:
        self.serial += 1
        return f"{self.prefix}-{self.serial:07d}-{kind}-{coding or 'identity'}"

    def _offer(self, stream: bool) -> tuple[str, str]:
        offer = self.rng.choices([o for o, _ in OFFERS], [w for _, w in OFFERS])[0]
        offered = [c.strip() for c in offer.split(",")]
        coding = next((c for c in (STREAM_PICK if stream else JSON_PICK) if c in offered), "")
        return offer, coding

    def call(
        self,
        kind: str,
        port: str,
        method: str,
        path: str,
        body: dict | None = None,
        expect: str = "json",
        client: str = "sdk",
        coding: str | None = None,
        **extra,
    ) -> Call:
        offer, picked = self._offer(expect != "json" or port == "gemini")
        if coding is not None:  # forced (identity for calls the gateway may retry)
            offer, picked = coding or "identity", coding
        headers = {"Accept-Encoding": offer, "x-fake-encoding": picked or "identity"}
        secret = secret_of(client)
        if port == "anthropic":
            headers |= {"x-api-key": secret, "anthropic-version": "2023-06-01"}
        else:
            headers["x-goog-api-key"] = secret
        if body is not None:
            headers["Content-Type"] = "application/json"
        headers.update(extra.pop("headers", {}))
        data = json.dumps(body).encode() if body is not None else b""
        return Call(
            self._id(kind, picked), kind, port, method, path, headers, data, expect, **extra
        )

    def messages(self, kind: str, stream: bool, events: int = 3, gap_ms: int = 0, **kw) -> Call:
        body = {
            "model": ANTHROPIC_MODEL,
            "max_tokens": 64,
            "stream": stream,
            "messages": [{"role": "user", "content": "soak"}],
        }
        headers = {
            "x-fake-events": str(events),
            "x-fake-gap-ms": str(gap_ms),
            "x-fake-stamp": "1",
            "x-fake-input-tokens": str(self.rng.randint(10, 5000)),
            **kw.pop("headers", {}),
        }
        if not stream:
            headers["x-fake-output-tokens"] = str(self.rng.randint(1, 800))
        return self.call(
            kind,
            "anthropic",
            "POST",
            "/v1/messages?beta=true",
            body,
            "anthropic_sse" if stream else "json",
            headers=headers,
            **kw,
        )

    def gemini(
        self,
        kind: str,
        action: str,
        model: str = "gemini-2.5-flash",
        events: int = 3,
        gap_ms: int = 0,
        **kw,
    ) -> Call:
        body = {"contents": [{"role": "user", "parts": [{"text": "soak"}]}]}
        path = f"/v1beta/models/{model}:{action}"
        expect = "json"
        if action == "streamGenerateContent":
            sse = self.rng.random() < 0.8
            path += "?alt=sse" if sse else ""
            expect = "gemini_sse" if sse else "gemini_array"
        headers = {
            "x-fake-events": str(events),
            "x-fake-gap-ms": str(gap_ms),
            "x-fake-stamp": "1",
            "x-fake-input-tokens": str(self.rng.randint(5, 3000)),
            "x-fake-output-tokens": str(self.rng.randint(1, 500)),
            **kw.pop("headers", {}),
        }
        return self.call(kind, "gemini", "POST", path, body, expect, headers=headers, **kw)

    def session_start(self, client: str) -> list[Call]:
        return [
            self.call("models", "anthropic", "GET", "/v1/models?limit=1000", client=client),
            self.call(
                "count_tokens",
                "anthropic",
                "POST",
                "/v1/messages/count_tokens?beta=true",
                {"model": ANTHROPIC_MODEL, "messages": [{"role": "user", "content": "x"}]},
                client=client,
            ),
        ]

    def long_stream(self, client: str) -> Call:
        """A session's main turn: a few hundred paced deltas; sometimes a fault."""
        p, roll = self.plan, self.rng.random()
        kw: dict = {"client": client}
        if roll < 0.06:
            kind, kw["hangup_after"] = "long_hangup", self.rng.randint(3, p.long_events // 2)
        elif roll < 0.08:
            kind, kw["headers"] = "long_drop", {"x-fake-scenario": "drop"}
        elif roll < 0.09:
            kind, kw["headers"] = (
                "long_stall",
                {"x-fake-scenario": f"stall-mid:{HTTP_TIMEOUT_S + 2}"},
            )
        else:
            kind = "long_stream"
        return self.messages(kind, True, p.long_events, p.long_gap_ms, **kw)

    def tool_call(self, client: str) -> Call:
        if self.rng.random() < 0.5:
            return self.messages("tool_json", False, client=client)
        return self.messages("tool_stream", True, self.rng.randint(5, 20), 10, client=client)

    SHORT = (
        ("a_json", 22),
        ("a_stream", 10),
        ("a_count", 4),
        ("a_models", 2),
        ("g_json", 20),
        ("g_stream", 14),
        ("g_count", 2),
        ("g_models", 1),
        ("a_429", 1.5),
        ("a_529", 1.5),
        ("g_429", 2),
        ("g_503", 0.5),
        ("bad_secret", 2),
        ("guesser", 0.5),
        ("slow_reader", 0.5),
        ("tight", 1.5),
        ("a_stall", 0.3),
        ("g_hangup", 1),
        ("g_drop", 0.7),
        ("a_drop", 0.5),
    )

    def short(self) -> Call:
        kind = self.rng.choices([k for k, _ in self.SHORT], [w for _, w in self.SHORT])[0]
        rng = self.rng
        if kind == "a_json":
            return self.messages(kind, False)
        if kind == "a_stream":
            return self.messages(kind, True, rng.randint(5, 40), 20)
        if kind == "a_count":
            return self.call(
                kind,
                "anthropic",
                "POST",
                "/v1/messages/count_tokens",
                {"model": ANTHROPIC_MODEL, "messages": []},
            )
        if kind == "a_models":
            return self.call(kind, "anthropic", "GET", f"/v1/models/{ANTHROPIC_MODEL}")
        if kind == "g_json":
            return self.gemini(kind, "generateContent")
        if kind == "g_stream":
            return self.gemini(kind, "streamGenerateContent", events=rng.randint(5, 40), gap_ms=30)
        if kind == "g_count":
            return self.call(
                kind,
                "gemini",
                "POST",
                "/v1beta/models/gemini-2.5-flash:countTokens",
                {"contents": []},
            )
        if kind == "g_models":
            return self.call(kind, "gemini", "GET", "/v1beta/models?pageSize=50")
        if kind in ("a_429", "a_529"):
            return self.messages(
                kind, rng.random() < 0.5, headers={"x-fake-scenario": f"error:{kind[2:]}"}
            )
        if kind == "g_429":
            # A per-model quota on a model only faults use: the gateway benches the key for
            # it (2 s) and retries on the next; all three over quota is its own 429.
            keys = "0" if rng.random() < 0.7 else "0,1,2"
            return self.gemini(
                kind,
                "generateContent",
                model="gemini-2.5-pro",
                coding="",
                headers={"x-fake-limited-keys": keys, "x-fake-retry-delay": "2s"},
            )
        if kind == "g_503":
            return self.gemini(
                kind, "generateContent", coding="", headers={"x-fake-scenario": "error:503"}
            )
        if kind == "bad_secret":
            call = self.messages(kind, False, source=rng.choice(self.bad_sources))
            call.headers["x-api-key"] = f"wrong-secret-{rng.randint(0, 10**9):010d}-padding"
            return call
        if kind == "guesser":  # one address over the failed-secret limit: 401s, then 429s
            call = self.gemini(kind, "generateContent", source="127.0.0.250")
            call.headers["x-goog-api-key"] = "wrong-secret-from-the-guesser-000000"
            return call
        if kind == "slow_reader":
            return self.messages(kind, False, slow=True, headers={"x-fake-pad-bytes": "100000"})
        if kind == "tight":
            return self.messages(kind, False, client="tight")
        if kind == "a_stall":
            return self.messages(
                kind, rng.random() < 0.5, headers={"x-fake-scenario": f"stall:{HTTP_TIMEOUT_S + 1}"}
            )
        if kind == "g_hangup":
            events = rng.randint(20, 40)
            return self.gemini(
                kind,
                "streamGenerateContent",
                events=events,
                gap_ms=30,
                hangup_after=rng.randint(2, events // 2),
            )
        if kind == "g_drop":
            return self.gemini(
                kind,
                "streamGenerateContent",
                events=10,
                gap_ms=20,
                headers={"x-fake-scenario": "drop"},
            )
        return self.messages("a_drop", True, 10, 20, headers={"x-fake-scenario": "drop"})
