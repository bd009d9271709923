"""The gateway with the test-only Echo provider registered: the one line adding it takes."""

from __future__ import annotations

import os

from shim.providers import REGISTRY
from tests.echo_provider import Echo

Echo.listen_port = int(os.environ["ECHO_PORT"])
Echo.upstream_url = os.environ["ECHO_UPSTREAM"]
REGISTRY.append(Echo)

from shim import create_app  # noqa: E402 - after the registry has the provider

app = create_app()
