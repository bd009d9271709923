"""A third provider that exists only in the tests: what adding a provider takes.

One module (this one) and one line in a registry (``tests/echo_wsgi.py``
appends it to ``shim.providers.REGISTRY``): its routes, where its secret
arrives (``x-echo-key``), its upstream credential (the fake's Anthropic key)
and its error shape. Nothing else in shim is touched.
"""

from __future__ import annotations

import json

from shim.errors import ProviderNotConfigured
from shim.providers.base import Provider, Route
from tests.fake_upstream import FAKE_API_KEY


class Echo(Provider):
    name = "echo"
    routes = (Route("/v1/messages", "messages", ("POST",)),)
    # Set by whoever registers it (a real provider names a settings field instead).
    listen_port = 0
    upstream_url = ""

    @classmethod
    def port(cls, settings) -> int:  # noqa: ANN001 - shim.settings.Settings
        return cls.listen_port

    @classmethod
    def from_settings(cls, settings, shared) -> Echo:  # noqa: ANN001
        return cls(cls.upstream_url)

    @property
    def configured(self) -> bool:
        return bool(self.upstream)

    def presented_secrets(self, environ: dict) -> list[bytes | None]:
        secret = environ.get("HTTP_X_ECHO_KEY")
        return [secret.encode("latin-1") if secret is not None else None]

    def add_credential(self, headers: dict[str, str], model: str | None = None) -> str | None:
        if not self.upstream:
            raise ProviderNotConfigured()
        headers["x-api-key"] = FAKE_API_KEY
        return "echo"

    @staticmethod
    def render_error(status: int, kind: str, message: str) -> bytes:
        return json.dumps({"echo_error": {"status": status, "kind": kind, "message": message}})\
            .encode()
