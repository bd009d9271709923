"""Claude Code and the Gemini CLI, run as users run them, pointed at a live gateway.

The CLIs are installed by scripts/test into tests/clients (pinned in its
package.json). Each runs with a throwaway HOME, telemetry and update checks
off, and every proxy variable pointed at a dead loopback port, so nothing but
the gateway on 127.0.0.1 is reachable from them.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import SECRET
from tests.fake_upstream import FAKE_GEMINI_KEYS, FAKE_OAUTH_TOKEN, OAUTH_BETA

BIN = Path(__file__).resolve().parent / "clients" / "node_modules" / ".bin"


def client_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TERM": "dumb",
        "CI": "1",
        "NO_COLOR": "1",
        # Any traffic not meant for the gateway goes to a port nobody listens on.
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.update(extra)
    return env


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    assert Path(argv[0]).exists(), f"{argv[0]} missing: run ./scripts/test to install the CLIs"
    return subprocess.run(
        argv,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("secret_variable", "discovery"),
    # Model discovery is skipped when non-essential traffic is disabled.
    [("ANTHROPIC_API_KEY", True), ("ANTHROPIC_AUTH_TOKEN", False)],
)
def test_claude_code_print_mode_streams_through_the_gateway(
    gateway, fake_upstream, tmp_path, test_id, secret_variable, discovery
):
    mode = (
        {"CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1"}
        if discovery
        else {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    )
    env = client_env(
        tmp_path,
        ANTHROPIC_BASE_URL=gateway.anthropic_url,
        ANTHROPIC_CUSTOM_HEADERS=f"x-test-id: {test_id}",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
        DISABLE_AUTOUPDATER="1",
        **mode,
        **{secret_variable: SECRET},
    )
    result = run([str(BIN / "claude"), "-p", "say hi"], env, tmp_path)

    assert result.returncode == 0, result.stderr[-2000:]
    assert "chunk0 chunk1 chunk2" in result.stdout
    seen = fake_upstream.matching(test_id)
    messages = [r for r in seen if r.path == "/v1/messages"]
    assert messages and all(r.query == "beta=true" for r in messages)
    assert any(json.loads(r.body).get("stream") for r in messages)
    for request in seen:
        assert request.header("authorization") == f"Bearer {FAKE_OAUTH_TOKEN}"
        assert OAUTH_BETA in request.header("anthropic-beta").split(",")
        assert "x-api-key" not in request.headers
        assert SECRET not in json.dumps(request.headers) + request.body.decode(errors="replace")
    # Claude Code's own betas survive the merge, in front of the OAuth one.
    assert any(r.header("anthropic-beta").startswith("claude-code-") for r in messages)
    # Model discovery asked the gateway for the model list.
    listed = any(r.path == "/v1/models" and "limit=1000" in r.query for r in seen)
    assert listed == discovery
    # Claude Code offers compression, the fake compresses as the real API does, and
    # shim still reads the stream's usage (from a decoded copy) into its access line.
    streamed = [r for r in messages if json.loads(r.body).get("stream")]
    assert "gzip" in streamed[0].header("accept-encoding")
    session = streamed[0].header("x-claude-code-session-id")
    assert session
    line = gateway.access_line(lambda line: line["claude_session_id"] == session
                               and line["stream"])
    assert (line["input_tokens"], line["stop_reason"], line["usage_unread"]) == (12, "end_turn",
                                                                                  None)


def test_gemini_cli_prompt_streams_through_the_gateway(gateway, fake_upstream, tmp_path, test_id):
    settings = {
        "security": {"auth": {"selectedType": "gemini-api-key"}},
        "privacy": {"usageStatisticsEnabled": False},
        "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
    }
    (tmp_path / ".gemini").mkdir()
    (tmp_path / ".gemini" / "settings.json").write_text(json.dumps(settings))
    env = client_env(
        tmp_path,
        GEMINI_API_KEY=SECRET,
        GOOGLE_GEMINI_BASE_URL=gateway.gemini_url,
        GEMINI_CLI_CUSTOM_HEADERS=f"x-test-id: {test_id}",
        GEMINI_CLI_TRUST_WORKSPACE="true",
        GEMINI_TELEMETRY_ENABLED="false",
    )
    started = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    result = run([str(BIN / "gemini"), "-p", "say hi"], env, tmp_path)

    assert result.returncode == 0, result.stderr[-2000:]
    assert "chunk0 chunk1 chunk2" in result.stdout
    seen = fake_upstream.matching(test_id)
    assert any(r.path.endswith(":streamGenerateContent") and r.query == "alt=sse" for r in seen)
    for request in seen:
        assert request.header("x-goog-api-key") in FAKE_GEMINI_KEYS
        assert SECRET not in json.dumps(request.headers) + request.query
    # The CLI offers compression; the fake compressed the stream; shim read its usage.
    streamed = [r for r in seen if r.path.endswith(":streamGenerateContent")]
    assert "gzip" in streamed[-1].header("accept-encoding")
    line = gateway.access_line(lambda line: line["provider"] == "gemini" and line["stream"]
                                and line["ts"] >= started, newest=True)
    assert (line["input_tokens"], line["stop_reason"], line["usage_unread"]) == (5, "STOP", None)
