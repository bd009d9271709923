"""The soak's plans (how long, how fast, how often) and what shim and the mix must agree on.

The clients and their secrets, and shim's upstream timeout that the stall faults outlast, are
here because both sides use them: soak_rig.py configures shim with them, soak_mix.py builds
calls against them. Nothing here runs anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """How long, how fast and how often: one for the real soak, one for the smoke."""

    duration_s: float
    short_per_s: float  # independent SDK-like calls
    session_every_s: float  # a new Claude Code-like session
    long_events: int  # deltas in a session's long stream
    long_gap_ms: int
    sample_s: float  # /proc and metrics sampling; also SHIM_SELF_STATS_S
    edit_every_s: float  # clients file rewrites
    grace_s: float  # SHIM_GRACEFUL_TIMEOUT_S
    warmup_s: float  # samples before this (and a new worker's first warmup_s) are not fitted
    # When the SIGHUP and the rolling restart happen, as fractions of the run. Early in the full
    # run: a worker's RSS climbs in allocator steps for its first ~8 minutes (the first 30-minute
    # run, reload at 35 % and restart at 60 %, left each worker ~10 minutes, mostly warm-up),
    # so the last workers need a long life after their warm-up for a slope to mean anything.
    sighup_at: float = 0.35
    restart_at: float = 0.6

    @property
    def rate(self) -> float:
        """Calls per second through shim, roughly: short calls, sessions (~8 each), probes."""
        return self.short_per_s + 8 / self.session_every_s + 2


FULL = Plan(1800, 44, 1.0, 300, 100, 5, 60, 20, 600, sighup_at=0.1, restart_at=0.2)
SMOKE = Plan(45, 20, 1.5, 60, 100, 2, 12, 10, 10)

HTTP_TIMEOUT_S = 3  # shim's upstream silence limit: the stall faults outlast it
CLIENTS = {  # name: limits (high enough never to refuse, except tight's rpm)
    "cc-1": "concurrency=200 rpm=100000 tokens_per_day=1000000000000",
    "cc-2": "concurrency=200 tokens_per_day=1000000000000",
    "sdk": "",
    "tight": "rpm=20",
}


def secret_of(name: str) -> str:
    return f"soak-secret-{name}-000000000000"
