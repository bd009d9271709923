"""Property tests (hypothesis) for every parser shim owns.

Path allow-listing, the anthropic-beta merge, query rewriting, key-file
parsing and settings validation, each against generated input.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

import responses
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shim import create_app
from shim.candidates import CREDENTIAL_PARAMS, query_params, without_credentials
from shim.keys import KeyFileError, load_keys
from shim.providers.anthropic import merge_beta
from shim.settings import ConfigError, Settings
from tests.conftest import ANTHROPIC_BASE, GEMINI_BASE, ROOT, SECRET, settings_env

# Every (path, method) shim may forward, per port, as upstream would see it.
_MODEL = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ACTIONS = "generateContent|streamGenerateContent|countTokens|embedContent|batchEmbedContents"
ALLOWED = {
    ANTHROPIC_BASE: [
        (re.compile(r"/v1/messages"), "POST"),
        (re.compile(r"/v1/messages/count_tokens"), "POST"),
        (re.compile(rf"/v1/models(/{_MODEL})?"), "GET"),
    ],
    GEMINI_BASE: [
        (re.compile(rf"/(v1|v1beta)/models(/{_MODEL})?"), "GET"),
        (re.compile(rf"/(v1|v1beta)/models/{_MODEL}:({_ACTIONS})"), "POST"),
    ],
}
SEGMENTS = st.sampled_from(
    [
        "v1",
        "v1beta",
        "models",
        "messages",
        "count_tokens",
        "gemini-2.5-flash:generateContent",
        "claude-x",
        "..",
        ".",
        "",
        "%2e%2e",
        "%2F",
        "%2f..",
        "a%00b",
        "é",
        "%C3%A9",
        "..%5c",
        ":countTokens",
        "x:streamGenerateContent",
        "%3A",
        "tunedModels",
        "~",
        "%252e",
    ]
)
APP = create_app(Settings.from_env(settings_env()))
CLIENT = APP.test_client()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    segments=st.lists(st.one_of(SEGMENTS, st.text(min_size=0, max_size=6)), max_size=6),
    port=st.sampled_from([ANTHROPIC_BASE, GEMINI_BASE]),
    method=st.sampled_from(["GET", "POST"]),
    leading=st.sampled_from(["/", "//", "/./"]),
)
def test_nothing_outside_the_allow_list_is_ever_forwarded(segments, port, method, leading):
    raw_path = leading + "/".join(quote(s, safe="%:.~") for s in segments)
    # What gunicorn puts in PATH_INFO: the percent-decoded path.
    path_info = unquote_to_bytes(raw_path).decode("latin-1")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        response = CLIENT.open(
            "/",
            method=method,
            base_url=port,
            data=b"{}",
            headers={"x-api-key": SECRET, "x-goog-api-key": SECRET},
            environ_overrides={"PATH_INFO": path_info},
        )
        sent = [call.request.url for call in mock.calls]
    allowed = any(
        pattern.fullmatch(path_info) and method == allowed_method
        for pattern, allowed_method in ALLOWED[port]
    )
    if not allowed:
        assert sent == [], (raw_path, path_info, sent)  # never forwarded...
        if path_info in ("/", "/health", "/health/ready") and method == "GET":
            return  # answered by shim itself
        assert response.status_code in (404, 405)  # ...and a provider-shaped refusal
        return
    # ...and what is allowed goes upstream once, with exactly that path.
    assert len(sent) == 1, (raw_path, path_info)
    upstream_path = "/" + sent[0].split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]
    assert upstream_path == path_info
    assert response.status_code == 502  # nothing was registered: upstream "unreachable"


BETA = st.text(alphabet="abcdefghij-0123456789", min_size=1, max_size=12)


@given(st.lists(BETA, max_size=8), st.sampled_from([",", ", ", " ,"]))
def test_beta_merge_keeps_order_drops_duplicates_and_adds_oauth_once(betas, separator):
    merged = merge_beta(separator.join(betas), "oauth-2025-04-20").split(",")
    expected = list(dict.fromkeys(betas))
    assert merged[: len(expected)] == expected
    assert merged.count("oauth-2025-04-20") == 1
    assert len(merged) == len(set(merged))
    assert merge_beta(",".join(merged), "oauth-2025-04-20").split(",") == merged  # idempotent


PARAM_NAME = st.one_of(
    st.sampled_from(
        ["key", "KEY", "%6Bey", "k%65y", "Api_Key", "access%5Ftoken", "alt", "pageSize", "key2"]
        + ["a+b", "%2B", ""]
    ),
    st.text(min_size=1, max_size=5),
)
PARAM_VALUE = st.text(min_size=0, max_size=8)


def _is_credential(name: bytes) -> bool:
    return name.lower() in CREDENTIAL_PARAMS


@given(st.lists(st.tuples(PARAM_NAME, PARAM_VALUE), max_size=8))
def test_query_rewrite_drops_every_credential_and_keeps_every_other_pair_in_order(pairs):
    encoded = [
        (name if "%" in name else quote(name, safe="+"), quote(value, safe=""))
        for name, value in pairs
    ]
    query = "&".join(f"{n}={v}" for n, v in encoded)
    rewritten = without_credentials(query)
    kept = [pair for name, pair in query_params(query) if not _is_credential(name)]
    assert (rewritten.split("&") if rewritten else []) == kept
    assert not any(_is_credential(name) for name, _ in query_params(rewritten))


KEY = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="#"),
    min_size=1,
    max_size=40,
)


@given(
    st.lists(KEY, min_size=1, max_size=10),
    st.lists(st.sampled_from(["", "   ", "# comment", "#", "  # indented"]), max_size=5),
    st.randoms(),
)
def test_key_file_parsing_returns_each_key_once_in_order(keys, noise, rnd):
    lines = [f"  {k}  # note" if rnd.random() < 0.3 else k for k in keys]
    for line in noise:  # comments and blank lines anywhere
        lines.insert(rnd.randrange(len(lines) + 1), line)
    text = "\n".join(lines)
    assert load_keys(text=text) == tuple(dict.fromkeys(keys))


@given(st.text(max_size=200))
def test_key_file_parsing_either_parses_or_says_why(text):
    try:
        keys = load_keys(text=text)
    except KeyFileError as error:
        assert "line" in str(error) or "entry" in str(error) or "no keys" in str(error)
    else:
        assert keys and all(k.isascii() and " " not in k for k in keys)


VARIABLES = sorted(
    set(re.findall(r'"(SHIM_[A-Z0-9_]+)"', (ROOT / "shim" / "settings.py").read_text()))
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(VARIABLES),
    st.one_of(
        st.text(max_size=30),
        st.integers().map(str),
        st.floats().map(str),
        st.sampled_from(
            [
                "0",
                "-1",
                "65536",
                "nan",
                "inf",
                "1e9",
                "http://",
                "*",
                "ftp://x",
                "https://h:99999",
                " ",
                "json",
                "TEXT",
            ]
        ),
    ),
)
def test_every_invalid_setting_is_a_config_error_naming_its_variable(variable, value):
    assume("\x00" not in value)
    env = settings_env(**{variable: value})
    try:
        Settings.from_env(env)
    except ConfigError as error:
        assert all(":" in problem for problem in error.problems)
        named = [problem for problem in error.problems if variable in problem.split(":")[0]]
        assert named or "no provider configured" in str(error), (variable, value, error.problems)
        if variable == "SHIM_SHARED_SECRET" and len(value) >= 12:
            assert value not in str(error)
