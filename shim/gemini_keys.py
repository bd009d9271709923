"""The Gemini key pool: keys handed out in turn, benched on a 429, shared among instances.

``KeyPool`` hands keys out round-robin and identifies each by a short stable
hash (``key_id``) so logs can say which key was used without ever holding
the key itself. A key (or a key for one model) that upstream answered 429 is
benched for a while; with ``SHIM_STATE_URL=redis://`` the bench is also put
in a ``RedisBenches`` on the process's ``shim.store.RedisConnection``, so one
instance's 429 benches the key for every instance. Redis failing
(``StateUnavailable``) leaves benches per worker until it is back.

What is not here: reading the key list (``shim.keys``), and what a 429 means
for a key (``shim.providers.gemini``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from shim.secret_files import key_id
from shim.store import RedisConnection, StateUnavailable

# How often a worker looks at benches other instances put in shared state.
SYNC_EVERY_S = 0.5
# A key rejected as invalid is benched this long for the other instances.
DISABLED_BENCH_S = 86_400.0
# A Gemini key bench: (key id, model), model None for the whole key.
Bench = tuple[str, str | None]
# The shared bench hash holds at most this many fields; past it a new bench
# stays in the worker that made it (model names come from request paths).
MAX_SHARED_BENCHES = 4096


class BenchStore(Protocol):
    """Where a pool shares its benches with the other instances."""

    def bench_key(self, ident: str, until: float, now: float, model: str | None = None) -> None:
        """Bench key ``ident`` (for ``model`` only, if given) until ``until``; keep a longer one."""

    def benched_keys(self, now: float) -> dict[Bench, float]:
        """The benches still running at ``now``: (key id, model or None) -> until."""
        ...


class MemoryBenches:
    """Benches in this process only (the contract of ``RedisBenches``, for tests)."""

    def __init__(self) -> None:
        self._benched: dict[Bench, float] = {}

    def bench_key(self, ident: str, until: float, now: float, model: str | None = None) -> None:
        for bench, ends in list(self._benched.items()):
            if ends <= now:
                del self._benched[bench]
        self._benched[(ident, model)] = max(until, self._benched.get((ident, model), 0.0))

    def benched_keys(self, now: float) -> dict[Bench, float]:
        return {bench: until for bench, until in self._benched.items() if until > now}


# Gemini key benches live in one hash, field "<key id>" (the whole key) or
# "<key id>:<model>" (model ids never hold ':'), value the time it ends.
# KEYS: benches hash. ARGV: field, until, now, most fields. Benches over by
# now are pruned, a longer bench already set is kept, a new field past the
# cap is refused (returns 0), and the hash expires with its last bench.
_BENCH = """
local now = tonumber(ARGV[3])
local last = tonumber(ARGV[2])
local fields = redis.call('HGETALL', KEYS[1])
local kept = 0
for i = 1, #fields, 2 do
  local ends = tonumber(fields[i + 1]) or 0
  if ends <= now then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    kept = kept + 1
    if ends > last then last = ends end
  end
end
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if current == 0 and kept >= tonumber(ARGV[4]) then return 0 end
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('EXPIRE', KEYS[1], math.ceil(last - now) + 60)
return 1
"""
_BENCHES = "shim:gemini:benched"


class RedisBenches:
    """Benches in one Redis hash shared by every worker of every instance."""

    def __init__(self, redis: RedisConnection):
        self._redis = redis
        self._bench = redis.script(_BENCH)

    def bench_key(self, ident: str, until: float, now: float, model: str | None = None) -> None:
        field = ident if model is None else f"{ident}:{model}"
        args = [field, repr(until), repr(now), MAX_SHARED_BENCHES]
        self._redis.call(lambda: self._bench(keys=[_BENCHES], args=args))

    def benched_keys(self, now: float) -> dict[Bench, float]:
        raw = self._redis.call(lambda: self._redis.client.hgetall(_BENCHES))
        benched: dict[Bench, float] = {}
        for field, until in raw.items():
            value = float(until)
            if value > now:
                ident, _, model = field.decode().partition(":")
                benched[(ident, model or None)] = value
        return benched


# Models benched at once per pool (bounds memory and the shared hash): model
# names come from request paths, so only models upstream actually answered a
# per-model quota 429 for are benched, and never more than this many.
MAX_BENCHED_MODELS = 32


class KeyPool:
    """Round-robin over a fixed set of keys, skipping keys benched or disabled.

    A bench is for the whole key (``model`` None: an unknown 429, a quota of
    the whole project) or for one (key, model) pair (a per-model quota: the
    key still serves every other model). Benches are kept in this worker and,
    when ``shared`` is a store shared by every instance (Redis), written there
    too and read back from it at most every ``SYNC_EVERY_S``: one instance's
    429 benches the key (or pair) for all. A failing shared store is skipped
    (benches stay per worker until it is back). Times are wall-clock seconds,
    the clock instances share. Keys are addressed by ``key_id`` outside this
    class so callers never hold or log one.
    """

    def __init__(
        self,
        keys: tuple[str, ...],
        clock: Callable[[], float] = time.time,
        shared: BenchStore | None = None,
    ):
        self._keys = keys
        self._ids = {key: key_id(key) for key in keys}
        self._by_id = {ident: key for key, ident in self._ids.items()}
        self._next = 0
        self._clock = clock
        self._cooling_until: dict[str, float] = {}  # key id -> wall-clock time it is back
        # (key id, model) -> wall-clock time the key serves that model again
        self._model_until: dict[tuple[str, str], float] = {}
        self._disabled: set[str] = set()
        self._reasons: dict[str, str] = {}  # key id -> why it was disabled
        self._on_change: Callable[[dict[str, int]], None] | None = None
        self._on_keys: Callable[[list[dict]], None] | None = None
        self._shared = shared
        self._synced = float("-inf")

    def on_change(self, callback: Callable[[dict[str, int]], None]) -> None:
        """Call ``callback(counts())`` now and whenever a key's state changes."""
        self._on_change = callback
        callback(self.counts())

    def on_keys(self, callback: Callable[[list[dict]], None]) -> None:
        """Call ``callback(per_key())`` now and whenever a key's state changes."""
        self._on_keys = callback
        callback(self.per_key())

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.counts())
        if self._on_keys is not None:
            self._on_keys(self.per_key())

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyPool(size={len(self._keys)}, ids={list(self._ids.values())})"

    def next_key(self, model: str | None = None) -> str | None:
        """Return the next key in turn available for ``model``, or None when none is now."""
        now = self._clock()
        if self._shared is not None and now - self._synced >= SYNC_EVERY_S:
            self._sync(now)
        count = len(self._keys)
        for step in range(count):
            key = self._keys[(self._next + step) % count]
            ident = self._ids[key]
            if ident in self._disabled:
                continue
            until = self._cooling_until.get(ident)
            if until is not None:
                if until > now:
                    continue
                del self._cooling_until[ident]
                self._changed()
            if model is not None and self._model_until:
                until = self._model_until.get((ident, model))
                if until is not None:
                    if until > now:
                        continue
                    del self._model_until[(ident, model)]
                    self._changed()
            self._next = (self._next + step + 1) % count
            return key
        return None

    def _sync(self, now: float) -> None:
        self._synced = now
        try:
            benched = self._shared.benched_keys(now)  # type: ignore[union-attr]
        except StateUnavailable:
            return
        changed = False
        for (ident, model), until in benched.items():
            if ident not in self._by_id:
                continue
            if model is None:
                if until > self._cooling_until.get(ident, 0.0):
                    self._cooling_until[ident] = until
                    changed = True
            elif until > self._model_until.get((ident, model), 0.0) and self._room_for(model, now):
                self._model_until[(ident, model)] = until
                changed = True
        if changed:
            self._changed()

    def _share(self, ident: str, until: float, model: str | None = None) -> None:
        if self._shared is not None:
            try:
                self._shared.bench_key(ident, until, self._clock(), model)
            except StateUnavailable:
                pass  # this worker still benches it; the others learn from their own 429

    def _room_for(self, model: str, now: float) -> bool:
        """True if ``model`` is benched already or another model may be (expired ones go)."""
        for pair, until in list(self._model_until.items()):
            if until <= now:
                del self._model_until[pair]
        models = {benched for _, benched in self._model_until}
        return model in models or len(models) < MAX_BENCHED_MODELS

    def id_of(self, key: str) -> str:
        return self._ids.get(key) or key_id(key)

    def cool_down(self, ident: str, seconds: float, model: str | None = None) -> bool:
        """Bench the key ``ident`` (for ``model`` only, if given) for ``seconds``.

        A longer bench already set is kept. False if nothing was benched: an
        unknown key, or ``MAX_BENCHED_MODELS`` other models benched already.
        """
        if ident not in self._by_id:
            return False
        now = self._clock()
        until = now + max(0.0, seconds)
        if model is None:
            self._cooling_until[ident] = max(until, self._cooling_until.get(ident, 0.0))
        elif self._room_for(model, now):
            pair = (ident, model)
            self._model_until[pair] = max(until, self._model_until.get(pair, 0.0))
        else:
            return False
        self._changed()
        self._share(ident, until, model)
        return True

    def disable(self, ident: str, reason: str = "") -> None:
        """Take the key ``ident`` out of rotation for the life of the process."""
        if ident in self._by_id:
            self._disabled.add(ident)
            self._reasons[ident] = reason
            self._cooling_until.pop(ident, None)
            self._changed()
            self._share(ident, self._clock() + DISABLED_BENCH_S)

    def seconds_until_available(self, model: str | None = None) -> float | None:
        """Seconds until a key serves ``model`` again; None if every key is disabled."""
        now = self._clock()
        waits = []
        for ident in self._by_id:
            if ident in self._disabled:
                continue
            until = self._cooling_until.get(ident, now)
            if model is not None:
                until = max(until, self._model_until.get((ident, model), now))
            waits.append(max(0.0, until - now))
        return min(waits) if waits else None

    def states(self) -> dict[str, int]:
        """Count keys by state: available, cooling, disabled (whole-key benches only)."""
        now = self._clock()
        cooling = sum(
            1
            for ident, until in self._cooling_until.items()
            if until > now and ident not in self._disabled
        )
        disabled = len(self._disabled)
        return {
            "available": len(self._keys) - cooling - disabled,
            "cooling": cooling,
            "disabled": disabled,
        }

    def counts(self) -> dict[str, int]:
        """``states()`` plus ``model_benched``: available keys benched for some model."""
        counts = self.states()
        now = self._clock()
        whole = {i for i, until in self._cooling_until.items() if until > now} | self._disabled
        counts["model_benched"] = len(
            {i for (i, _), until in self._model_until.items() if until > now} - whole
        )
        return counts

    def per_key(self) -> list[dict]:
        """Each key in configured order by its id (a short hash, never the key).

        ``state`` (available, cooling, disabled), ``until`` (wall-clock end of a
        whole-key bench, 0.0 if none), ``reason`` (why disabled, may be empty)
        and ``models`` (model -> wall-clock end of its bench on this key).
        """
        now = self._clock()
        rows = []
        for key in self._keys:
            ident = self._ids[key]
            until = self._cooling_until.get(ident, 0.0)
            state = ("disabled" if ident in self._disabled
                     else "cooling" if until > now else "available")
            rows.append({
                "id": ident,
                "state": state,
                "until": until if state == "cooling" else 0.0,
                "reason": self._reasons.get(ident, "") if state == "disabled" else "",
                "models": {model: t for (i, model), t in sorted(self._model_until.items())
                           if i == ident and t > now},
            })
        return rows

    def benches(self) -> list[dict]:
        """Each key in configured order: its state and the models it is benched for (s left).

        No key or key id: the position in the key list is what names a key here.
        """
        now = self._clock()
        per_key: list[dict] = []
        for key in self._keys:
            ident = self._ids[key]
            if ident in self._disabled:
                state = "disabled"
            elif self._cooling_until.get(ident, 0.0) > now:
                state = "cooling"
            else:
                state = "available"
            models = {
                model: int(until - now + 0.999)
                for (i, model), until in sorted(self._model_until.items())
                if i == ident and until > now
            }
            per_key.append({"state": state, "benched_models": models})
        return per_key
