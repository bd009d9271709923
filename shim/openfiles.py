"""The open-file limit each worker needs for ``SHIM_WORKER_CONNECTIONS`` streams.

Every stream holds two descriptors in its worker: the client's socket and
the upstream socket. On top of that a worker holds a fixed few (listening
sockets, log, Redis, metrics files, the upstream pool's idle connections):
``HEADROOM``. Many boxes start services with a soft ``RLIMIT_NOFILE`` of
1024, which caps a worker near 480 streams, and past it ``accept`` or the
upstream ``connect`` fails with EMFILE: the client sees a dropped connection
or a 502 (issue #14).

``check`` runs once in the gunicorn master before the workers are forked,
and they inherit the limit. It raises the soft limit to the hard limit when
the soft one is short (Go's runtime and nginx's ``worker_rlimit_nofile`` do
the same: the soft default exists for ``select()``, which nothing here uses;
gevent waits with epoll), then logs a warning if even that is short: the fix
is ``LimitNOFILE=`` in the systemd unit or ``ulimits: nofile`` in compose.

Standard library only: gunicorn.conf.py, which loads it, must not import the app.
"""

from __future__ import annotations

import logging
import resource

# Descriptors a worker holds besides its streams' two each.
HEADROOM = 64


def needed(worker_connections: int) -> int:
    """Descriptors one worker needs to hold ``worker_connections`` streams."""
    return 2 * worker_connections + HEADROOM


def check(worker_connections: int, log: logging.Logger) -> int:
    """Raise the soft open-file limit if short, warn if it still is; return the soft limit."""
    need = needed(worker_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need and soft != hard:
        target = need if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # a container may refuse; the warning below says what to change
        else:
            log.info(
                "open-file soft limit raised for the workers",
                extra={
                    "event": "open_files_limit_raised",
                    "nofile_from": soft,
                    "nofile_to": target,
                },
            )
            soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "open-file limit too low for SHIM_WORKER_CONNECTIONS streams per worker; "
            "raise LimitNOFILE (systemd) or ulimits nofile (compose)",
            extra={
                "event": "open_files_limit_low",
                "nofile_soft": soft,
                "nofile_hard": hard,
                "nofile_needed": need,
                "worker_connections": worker_connections,
                "streams_possible": max(0, (soft - HEADROOM) // 2),
            },
        )
    return soft
