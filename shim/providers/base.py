"""What a provider declares, and the one function that turns it into a blueprint.

A provider says what differs between upstream APIs: the routes it serves,
where a client presents the shared secret, which client headers carry that
secret, how the upstream credential is attached, and how an error looks on
its wire. Everything else (reading the body, sending upstream, relaying the
answer) is the shared core in ``shim.forward``; nothing here sends traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shim.access import AccessRecord
from shim.candidates import CREDENTIAL_HEADERS, without_credentials
from shim.errors import GatewayError

if TYPE_CHECKING:
    from shim.settings import Settings
    from shim.state import RedisState

JSON = "application/json"


@dataclass(frozen=True)
class Route:
    rule: str
    endpoint: str
    methods: tuple[str, ...]


class Provider:
    """Base for a provider spec; subclasses fill in the class attributes and hooks."""

    name: str = ""
    routes: tuple[Route, ...] = ()
    # Lower-case header names never forwarded: every credential header of *either*
    # API, whichever port it arrived on (issue #14), not just where this one reads.
    client_credential_headers: frozenset[str] = CREDENTIAL_HEADERS
    # Upstream statuses whose (small) body the core reads and shows to after_failure.
    retry_statuses: frozenset[int] = frozenset()
    # The access-record field that names the credential used (None: not logged).
    credential_log_field: str | None = None
    # How SSE events are separated, and the markers of events that carry usage.
    event_separator: bytes = b"\n\n"
    usage_markers: tuple[bytes, ...] = ()

    # The Settings field holding the port this provider listens on.
    port_setting: str = ""

    @classmethod
    def port(cls, settings: Settings) -> int:
        """The port this provider listens on (its settings section says)."""
        return getattr(settings, cls.port_setting)

    @classmethod
    def from_settings(cls, settings: Settings, shared: RedisState | None) -> Provider:
        """Build this provider from the validated settings (``shared``: Redis, if configured)."""
        raise NotImplementedError

    @staticmethod
    def render_error(status: int, kind: str, message: str) -> bytes:
        """An error body in this provider's JSON shape (also for gunicorn's framing errors)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What the start-up log line says about this provider (never a secret)."""
        return {"configured": self.configured}

    def __init__(self, upstream: str):
        self.upstream = upstream
        # What this worker last heard from upstream (for readiness; never an upstream probe).
        self.last_upstream_status: int | None = None

    @property
    def configured(self) -> bool:
        raise NotImplementedError

    def presented_secrets(self, environ: dict) -> list[bytes | None]:
        """Return every value found where this port accepts the secret (duplicates included).

        shim.web reduces them to distinct candidates (shim.candidates.distinct).
        """
        raise NotImplementedError

    def upstream_query(self, query: str, secret: bytes | None = None) -> str:
        """Return the query to forward: no credential parameter, nothing carrying ``secret``."""
        return without_credentials(query, secret)

    def own_credential(self, environ: dict, headers: dict[str, str]) -> str | None:
        """Put a credential the client brought for upstream into ``headers``; return its id.

        None (the default): shim's own credential is added by ``add_credential``.
        """
        return None

    def add_credential(self, headers: dict[str, str], model: str | None = None) -> str | None:
        """Attach the upstream credential for a call to ``model`` (the route's, if any).

        Return a loggable credential id, if any.
        """
        raise NotImplementedError

    def after_failure(
        self,
        credential: str | None,
        status: int,
        headers: dict,
        body: bytes,
        model: str | None = None,
    ) -> bool:
        """Learn from an error answer on ``credential``; True asks for one retry on another.

        Called before any byte went to the client, so a retry is invisible to it.
        ``model`` is the route's model, as given to ``add_credential``.
        """
        return False

    def read_request(self, environ: dict, record: AccessRecord) -> None:
        """Note what the client's request says about itself (attribution) in ``record``."""

    def read_headers(self, headers: object, record: AccessRecord) -> None:
        """Copy what the upstream's response headers say (quota state) into ``record``."""

    def read_error(
        self, status: int, content_encoding: str | None, body: bytes, record: AccessRecord
    ) -> None:
        """Learn from an error answer read whole (``body`` as sent; read a decoded copy).

        Never changes what the client gets; shim.forward relays ``body`` as is.
        """

    def read_usage(self, data: dict, record: AccessRecord) -> None:
        """Copy model, token counts and stop reason from an answer or event into ``record``."""

    def error_body(self, error: GatewayError) -> bytes:
        """Render ``error`` in this provider's JSON error shape."""
        return self.render_error(error.status, error.kind, error.message)

    def stream_error_frame(self, error: GatewayError, content_type: str) -> bytes | None:
        """Return a frame that tells a streaming client about ``error``, or None to abort."""
        return None

    def observe(self, record: AccessRecord) -> None:
        """Learn from one finished call of this provider (readiness is per worker)."""
        if record.upstream_status is not None:
            self.last_upstream_status = record.upstream_status

    def readiness(self) -> dict:
        """This provider's part of ``GET /health/ready``; ``ready`` says whether it can serve."""
        return {
            "configured": self.configured,
            "ready": self.configured,
            "last_upstream_status": self.last_upstream_status,
        }
