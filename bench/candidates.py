"""What issue #14's per-request secret handling costs, in process, against before it.

    .venv/bin/python bench/candidates.py

Per request shim now (a) reduces the presented values to distinct candidates
and (b) builds the upstream headers and path without any credential header or
parameter of either API and without any header or pair carrying the secret.
"Before" is the code as it was at 0a3bcaf (each provider stripped only its
own places; no value check), rebuilt here from the same functions so both run
in one process on the same environs. No server, no traffic.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path
from urllib.parse import unquote_to_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shim.candidates import SECRET_ENVIRON, distinct  # noqa: E402
from shim.forward import upstream_headers, upstream_path  # noqa: E402
from shim.keys import KeyPool  # noqa: E402
from shim.providers.anthropic import Anthropic  # noqa: E402
from shim.providers.gemini import Gemini  # noqa: E402

SECRET = "bench-shared-secret-0123456789abcdef"

CLAUDE_CODE = {
    "REQUEST_METHOD": "POST",
    "PATH_INFO": "/v1/messages",
    "QUERY_STRING": "beta=true",
    "CONTENT_TYPE": "application/json",
    "HTTP_HOST": "127.0.0.1:8889",
    "HTTP_CONNECTION": "keep-alive",
    "HTTP_ACCEPT": "application/json",
    "HTTP_ACCEPT_ENCODING": "gzip, deflate, br, zstd",
    "HTTP_X_API_KEY": SECRET,
    "HTTP_ANTHROPIC_VERSION": "2023-06-01",
    "HTTP_ANTHROPIC_BETA": "claude-code-20250219,interleaved-thinking-2025-05-14",
    "HTTP_ANTHROPIC_DANGEROUS_DIRECT_BROWSER_ACCESS": "true",
    "HTTP_USER_AGENT": "claude-cli/2.1.0 (external, cli)",
    "HTTP_X_APP": "cli",
    "HTTP_X_STAINLESS_ARCH": "x64",
    "HTTP_X_STAINLESS_LANG": "js",
    "HTTP_X_STAINLESS_OS": "Linux",
    "HTTP_X_STAINLESS_PACKAGE_VERSION": "0.60.0",
    "HTTP_X_STAINLESS_RETRY_COUNT": "0",
    "HTTP_X_STAINLESS_RUNTIME": "node",
    "HTTP_X_STAINLESS_RUNTIME_VERSION": "v22.11.0",
    "HTTP_X_STAINLESS_TIMEOUT": "600",
    "HTTP_X_CLAUDE_CODE_SESSION_ID": "7a0c6f0e-7b3c-4a0e-9d55-0f3b2f4d1e11",
    "CONTENT_LENGTH": "2048",
}
GENAI_SDK = {
    "REQUEST_METHOD": "POST",
    "PATH_INFO": "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
    "QUERY_STRING": "alt=sse",
    "CONTENT_TYPE": "application/json",
    "HTTP_HOST": "127.0.0.1:8890",
    "HTTP_ACCEPT_ENCODING": "gzip, deflate",
    "HTTP_X_GOOG_API_KEY": SECRET,
    "HTTP_USER_AGENT": "google-genai-sdk/1.20.0 gl-python/3.12.3",
    "HTTP_X_GOOG_API_CLIENT": "google-genai-sdk/1.20.0 gl-python/3.12.3",
    "CONTENT_LENGTH": "512",
}
CURL_KEY = {**GENAI_SDK, "QUERY_STRING": f"alt=sse&key={SECRET}"}
del CURL_KEY["HTTP_X_GOOG_API_KEY"]


# --- before (0a3bcaf), reduced to what differs ------------------------------------------------
def _old_query_params(query: str) -> list[tuple[bytes, str]]:
    return [
        (unquote_to_bytes(p.split("=", 1)[0].replace("+", " ")), p) for p in query.split("&") if p
    ]


def _old_without_key(query: str) -> str:
    if "key" not in query.lower() and "%" not in query:
        return query
    return "&".join(pair for name, pair in _old_query_params(query) if name != b"key")


class _OldAnthropic:
    client_credential_headers = frozenset({"x-api-key", "authorization"})

    def upstream_query(self, query: str, secret: bytes | None = None) -> str:
        return query


class _OldGemini:
    client_credential_headers = frozenset({"x-goog-api-key", "authorization"})

    def upstream_query(self, query: str, secret: bytes | None = None) -> str:
        return _old_without_key(query)


def per_request(provider, environ: dict) -> None:
    candidates = distinct(provider.presented_secrets(environ))
    environ[SECRET_ENVIRON] = candidates[0]  # as shim.web leaves it
    upstream_headers(environ, provider.client_credential_headers)
    upstream_path(environ, provider)


def old_per_request(old, provider, environ: dict) -> None:
    provider.presented_secrets(environ)  # the old auth used the list as it came
    upstream_headers(environ, old.client_credential_headers)  # no secret in environ: no scan
    upstream_path(environ, old)


def main() -> None:
    anthropic = Anthropic("https://a.test", "sk-ant-api-bench", None)
    gemini = Gemini("https://g.test", KeyPool(("AIza-bench-key",)))
    cases = [
        ("Claude Code POST /v1/messages?beta=true", anthropic, _OldAnthropic(), CLAUDE_CODE),
        ("google-genai streamGenerateContent", gemini, _OldGemini(), GENAI_SDK),
        ("curl ?key=&alt=sse", gemini, _OldGemini(), CURL_KEY),
    ]
    number = 50_000
    print(f"{'case':42} {'before µs':>10} {'now µs':>10} {'added µs':>10}")
    for label, provider, old, environ in cases:
        before_env, now_env = dict(environ), dict(environ)
        before = min(
            timeit.repeat(
                lambda e=before_env, p=provider, o=old: old_per_request(o, p, e),
                number=number,
                repeat=5,
            )
        )
        now = min(
            timeit.repeat(lambda e=now_env, p=provider: per_request(p, e), number=number, repeat=5)
        )
        b, n = before / number * 1e6, now / number * 1e6
        print(f"{label:42} {b:10.2f} {n:10.2f} {n - b:10.2f}")


if __name__ == "__main__":
    main()
