"""Request targets: checked before routing (lectr/proxy/target.py)."""

from __future__ import annotations

import posixpath
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.providers.registry import ProviderRegistry, discover
from lectr.proxy.target import route, target_problem

REGISTRY = ProviderRegistry(
    [cls() if cls.default_base_url else cls("https://x") for cls in discover()]
)

# The table of hostile paths the routing issue asks for: each is a 400.
HOSTILE = [
    b"/v1/../admin/orgs",
    b"/openai/v1/../../x",
    b"/anthropic/v1/../../x",
    b"/openai/v1/%2e%2e/%2e%2e/x",
    b"/openai/v1/%2E%2E/x",
    b"/openai/v1/.%2e/x",
    b"/openai/v1/%2e./x",
    b"/openai/v1/models/..",
    b"/openai/v1/./models",
    b"/openai/v1/chat%2fcompletions",
    b"/openai/v1/chat%2Fcompletions",
    b"/openai/v1/chat%5ccompletions",
    b"/openai/v1/chat\\completions",
    b"/openai/v1//chat/completions",
    b"//openai/v1/chat/completions",
    b"/openai/v1/..;/x",
    b"/openai/v1/%252e%252e/x",
    b"/openai/v1/models%00",
    b"/openai/v1/models#frag",
    b"/openai/v1/mod\x85els",
    b"/openai/v1/models?x=%G1",
    b"/openai/v1/mo dels",
    b"/openai/v1/\xc3\xa9",
]


@pytest.mark.parametrize("target", HOSTILE)
def test_hostile_targets_are_refused(target):
    assert target_problem(target) is not None


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/chat/completions",
        b"/openai/v1/models?limit=5&after=abc%20d",
        b"/openai/v1/files/file-abc/content",
        b"/anthropic/v1/messages?beta=true",
        b"/gemini/v1/models/gemini-2.0-flash:generateContent",
        b"/openai/v1/x?q=a/b?c=..",
    ],
)
def test_ordinary_targets_pass(target):
    assert target_problem(target) is None


def _resolved(path: bytes) -> str:
    """The path as a server that decodes escapes and normalises dot segments
    (as many do) would see it."""
    decoded = unquote(path.decode("ascii").replace("\\", "/"))
    return posixpath.normpath(decoded.replace(";", "/"))


segments = st.sampled_from(
    [
        "v1",
        "chat",
        "completions",
        "..",
        ".",
        "%2e",
        "%2E%2e",
        "%2f",
        "%5c",
        "\\",
        "",
        ";",
        "%252e",
        "%00",
        "models",
        "a%20b",
        ".%2e",
        "x..y",
    ]
)


@settings(max_examples=2000)
@given(
    st.sampled_from([b"/openai/v1/", b"/anthropic/v1/", b"/v1/", b"/groq/v1/"]),
    st.lists(segments, max_size=6),
)
def test_no_accepted_path_leaves_its_provider_prefix(prefix, parts):
    target = prefix + "/".join(parts).encode()
    if target_problem(target) is not None:
        return
    entry = route(target, False, REGISTRY)
    assert entry is not None
    # whatever a provider does with the path, it stays below the API root
    seen = _resolved(entry.api_path)
    assert seen == "/v1" or seen.startswith("/v1/"), (target, seen)


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_arbitrary_targets_are_refused_or_visible_ascii(raw):
    target = b"/" + raw
    if target_problem(target) is None:
        assert all(0x21 <= b <= 0x7E and b != 0x23 for b in target)


def test_routes():
    assert route(b"/v1/messages", False, REGISTRY).provider.name == "anthropic"
    assert route(b"/v1/chat/completions", True, REGISTRY).provider.name == "anthropic"
    entry = route(b"/v1/chat/completions", False, REGISTRY)
    assert (entry.provider.name, entry.api_path, entry.auto) == (
        "openai",
        b"/v1/chat/completions",
        True,
    )
    entry = route(b"/groq/v1/chat/completions", False, REGISTRY)
    assert (entry.provider.name, entry.api_path, entry.auto) == (
        "groq",
        b"/v1/chat/completions",
        False,
    )
    assert route(b"/nope/v1/x", False, REGISTRY) is None
    assert route(b"/openai/v2/x", False, REGISTRY) is None
    assert route(b"/openai/v1x", False, REGISTRY) is None
    assert route(b"/openai", False, REGISTRY) is None


@settings(max_examples=1000)
@given(st.binary(max_size=60))
def test_the_path_rules_alone_agree_on_targets_the_server_lets_through(raw):
    """The proxy checks only the path rules on targets the HTTP server already
    found well-formed; both checks must refuse the same targets."""
    target = b"/" + raw
    if target_problem(target) is None or not _server_accepts(target):
        return
    assert target_problem(target, syntax_checked=True) is not None


def _server_accepts(target: bytes) -> bool:
    from lectr.http import server

    return server._TARGET.fullmatch(target) is not None  # as ServerProtocol checks it
