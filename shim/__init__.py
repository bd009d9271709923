"""shim: one door for coding agents to Anthropic and Gemini, behind one shared secret.

``create_app`` imports the web stack lazily, inside the call, so gunicorn's
master can import ``shim.settings`` (to bind the ports from the same validated
settings) without pulling in requests/ssl before gevent patches the workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from shim.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the WSGI app from ``settings`` (default: validated from the environment)."""
    from shim.app import build_app

    return build_app(settings)
