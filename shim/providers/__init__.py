"""One module per upstream API; each only declares what differs (see base.py).

``REGISTRY`` is the one list of providers: adding one is a module, a line
here, and its settings section (its port, upstream and credential).
"""

from __future__ import annotations

from shim.providers.anthropic import Anthropic
from shim.providers.base import Provider
from shim.providers.gemini import Gemini

REGISTRY: list[type[Provider]] = [Anthropic, Gemini]
