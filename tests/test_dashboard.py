"""The dashboard's server side: its files (in the package and in a built
wheel), how they are served (versioned paths, caching, security headers),
``GET /admin/ui-config`` and OIDC discovery. The pages themselves are
tested in a real Chromium (tests/browser/)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

import pytest
import pytest_twisted
import treq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import task

from lectr.admin.signin import (
    DiscoveryUnavailable,
    OIDCDiscovery,
    SignInOptions,
    discovery_url,
    parse_discovery,
)
from lectr.admin.site import AdminRoot
from lectr.config import OIDCConfig
from lectr.dashboard.assets import Assets
from lectr.dashboard.resource import DashboardResource
from tests.support.admin import start_admin_env
from tests.support.process import REPO

STATIC = REPO / "lectr" / "dashboard" / "static"
#: the issue's budget for everything the first load fetches
FIRST_LOAD_BUDGET = 300_000


def header(response, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def csp_directives(response) -> dict[str, list[str]]:
    policy = header(response, "content-security-policy") or ""
    out = {}
    for part in policy.split(";"):
        words = part.split()
        if words:
            out[words[0]] = words[1:]
    return out


# --- the files -----------------------------------------------------------------------


def test_every_shipped_file_is_served_and_nothing_else():
    assets = Assets.load()
    on_disk = sorted(str(p.relative_to(STATIC)) for p in STATIC.rglob("*") if p.is_file())
    assert sorted([*assets.names, "index.html"]) == on_disk
    # the index names its files by the content hash, and preloads every module
    index = assets.index.body.decode()
    assert "%BASE%" not in index and "%PRELOAD%" not in index
    assert f'src="/ui/{assets.version}/js/app.js"' in index
    for name in assets.names:
        if name.endswith(".js"):
            assert f'href="/ui/{assets.version}/{name}"' in index, name


def test_first_load_fits_the_budget():
    size = Assets.load().size()
    print(f"\ndashboard first load: {size} bytes uncompressed (budget {FIRST_LOAD_BUDGET})")
    assert size < FIRST_LOAD_BUDGET


def test_the_version_is_a_content_hash():
    sources = {str(p.relative_to(STATIC)): p.read_bytes() for p in STATIC.rglob("*") if p.is_file()}
    same = Assets(dict(sources))
    assert same.version == Assets.load().version
    changed = Assets({**sources, "app.css": sources["app.css"] + b"\n/* changed */"})
    assert changed.version != same.version
    assert changed.get(same.version, "app.css") is None  # an old version is not served


def test_no_inline_script_or_style_and_no_html_from_strings():
    """What the CSP (and Trusted Types) would refuse at run time is absent
    from the source: inline handlers, style attributes, string-to-HTML sinks,
    eval."""
    index = (STATIC / "index.html").read_text()
    assert "<style" not in index and " style=" not in index
    assert re.search(r"<script(?![^>]*\bsrc=)", index) is None  # every script has a src
    for path in STATIC.rglob("*.js"):
        code = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in code, (path.name, sink)
        assert "new Function" not in code and 'setAttribute("style"' not in code, path.name
        assert "localStorage." not in code, path.name  # tokens live in sessionStorage only


def test_every_module_parses():
    node = subprocess.run(["node", "--version"], capture_output=True).returncode == 0
    if not node:
        pytest.skip("node is not installed (only used to check the modules' syntax)")
    for path in STATIC.rglob("*.js"):
        out = subprocess.run(
            ["node", "--check", "--input-type=module"],
            stdin=path.open(),
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, (path.name, out.stderr)


@pytest.mark.slow
def test_a_built_wheel_ships_the_dashboard(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(REPO), "-w", tmp_path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("lectr-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {
            n.removeprefix("lectr/dashboard/static/"): z.read(n)
            for n in z.namelist()
            if n.startswith("lectr/dashboard/static/")
        }
    on_disk = {str(p.relative_to(STATIC)): p.read_bytes() for p in STATIC.rglob("*") if p.is_file()}
    assert shipped == on_disk
    assert Assets(shipped).version == Assets.load().version


# --- serving ------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def env(db_url, tmp_path):
    e = await start_admin_env(db_url, tmp_path)
    yield e
    await e.stop()


SECURITY = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}


def check_security_headers(response, connect: list[str]) -> None:
    for name, value in SECURITY.items():
        assert header(response, name) == value, name
    csp = csp_directives(response)
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'", *connect]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"]
    assert csp["require-trusted-types-for"] == ["'script'"]
    policy = header(response, "content-security-policy")
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert header(response, "set-cookie") is None


@pytest_twisted.ensureDeferred
async def test_index_and_assets_are_served_with_security_headers(env):
    base = env.admin.base_url
    index = await treq.get(base + "/", persistent=False)
    body = (await index.content()).decode()
    assert index.code == 200 and header(index, "content-type") == "text/html; charset=utf-8"
    assert header(index, "cache-control") == "no-cache"
    check_security_headers(index, [])
    # the OIDC callback lands on / with a query string
    callback = await treq.get(base + "/?code=abc&state=xyz", persistent=False)
    assert callback.code == 200 and (await callback.content()).decode() == body

    referenced = re.findall(r'(?:src|href)="(/ui/[^"]+)"', body)
    assert len(referenced) >= 10
    for url in referenced:
        response = await treq.get(base + url, persistent=False)
        content = await response.content()
        assert response.code == 200, url
        assert header(response, "cache-control") == "public, max-age=31536000, immutable"
        check_security_headers(response, [])
        name = url.split("/", 3)[3]
        assert content == (STATIC / name).read_bytes()
        kind = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
        assert header(response, "content-type").startswith(kind[name.rsplit(".", 1)[1]])


@pytest_twisted.ensureDeferred
async def test_unknown_paths_and_methods(env):
    base = env.admin.base_url
    version = Assets.load().version
    for path in (
        "/ui/0000000000000000/js/app.js",  # another version
        f"/ui/{version}/index.html",  # only at /
        f"/ui/{version}/nope.js",
        f"/ui/{version}/../../lectr/config.py",
        f"/ui/{version}/%2e%2e/%2e%2e/setup.cfg",
        f"/ui/{version}/js/../../../../etc/passwd",
        f"/ui/{version}",
        "/ui/",
    ):
        response = await treq.get(base + path, persistent=False)
        assert response.code == 404, path
        assert header(response, "x-content-type-options") == "nosniff"
        # (every dashboard response carries the policy, errors too: docs/dashboard.md)
        assert "default-src 'none'" in (header(response, "content-security-policy") or "")
    response = await treq.post(base + "/", data=b"x", persistent=False)
    assert response.code == 405 and header(response, "allow") == "GET, HEAD"
    assert "default-src 'none'" in (header(response, "content-security-policy") or "")
    # the API is untouched: JSON errors, its own headers
    missing = await treq.get(base + "/nope", persistent=False)
    assert missing.code == 404 and json.loads(await missing.content())["error"]["code"]
    api = await treq.get(base + "/admin/ui-config", persistent=False)
    assert header(api, "cache-control") == "no-store"
    assert header(api, "x-content-type-options") == "nosniff"


_segment = st.text(
    alphabet=st.characters(codec="ascii", exclude_characters="/?#"), min_size=0, max_size=12
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(_segment | st.sampled_from(["..", ".", "%2e%2e", "%2f", "js", ""]), max_size=6)
)
def test_any_path_under_ui_is_a_known_file_or_404(parts):
    """Whatever follows /ui/<version>/ is looked up by name in memory: the
    answer is one of the shipped files, byte for byte, or 404."""
    assets = Assets.load()
    root = AdminRoot(None, DashboardResource(assets))
    client = StubTreq(root)
    tail = "/".join(parts)
    url = f"http://dashboard.test/ui/{assets.version}/{tail}"
    try:
        d = client.get(url.encode("ascii", "replace"))
    except ValueError:
        return  # not a URL treq will send
    results = []
    d.addCallback(lambda r: client.content(r).addCallback(lambda body: results.append((r, body))))
    client.flush()
    ((response, body),) = results
    if response.code == 200:
        name = tail
        assert name in assets.names and body == (STATIC / name).read_bytes()
    else:
        assert response.code == 404
        assert body == b"not found\n"
        assert header(response, "x-content-type-options") == "nosniff"


# --- sign-in options and OIDC discovery ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ui_config_without_oidc_client(env):
    config = (await env.client(None).get("/admin/ui-config")).json
    assert config == {"version": config["version"], "admin_token": True, "oidc": None}


@pytest_twisted.ensureDeferred
async def test_ui_config_and_csp_with_an_oidc_client(db_url, tmp_path):
    from tests.support.oidc import LocalIssuer

    issuer = await LocalIssuer.start()
    try:
        e = await start_admin_env(db_url, tmp_path, **issuer.dashboard_env())
    except BaseException:
        await issuer.stop()
        raise
    try:
        anonymous = e.client(None)
        config = (await anonymous.get("/admin/ui-config")).json
        assert config["oidc"] == {
            "issuer": issuer.issuer,
            "client_id": issuer.client_id,
            "audience": issuer.audience,
            "scope": "openid profile email",
            "authorization_endpoint": issuer.origin + "/authorize",
            "token_endpoint": issuer.origin + "/oauth/token",
            "problem": None,
        }
        index = await treq.get(e.admin.base_url + "/", persistent=False)
        await index.content()
        check_security_headers(index, [issuer.origin])  # the code exchange
        assert issuer.discovery_hits == 1  # fetched once, then cached
    finally:
        await e.stop()
        await issuer.stop()


def discovery_doc(issuer: str, **overrides) -> bytes:
    doc = {
        "issuer": issuer,
        "authorization_endpoint": "https://id.example.com/authorize",
        "token_endpoint": "https://id.example.com/oauth/token",
        "code_challenge_methods_supported": ["S256"],
        **overrides,
    }
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


ISSUER = "https://id.example.com/"


def test_discovery_documents_are_checked():
    found = parse_discovery(discovery_doc(ISSUER), ISSUER)
    assert found.token_endpoint == "https://id.example.com/oauth/token"
    local = discovery_doc(ISSUER, token_endpoint="http://127.0.0.1:9/token")
    assert parse_discovery(local, ISSUER).token_endpoint == "http://127.0.0.1:9/token"
    for body, why in (
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (discovery_doc("https://evil.example.com/"), "another issuer"),
        (discovery_doc(ISSUER, token_endpoint="http://id.example.com/token"), "https"),
        (discovery_doc(ISSUER, authorization_endpoint="javascript:alert(1)"), "https"),
        (discovery_doc(ISSUER, token_endpoint="https://u:p@id.example.com/t"), "https"),
        (discovery_doc(ISSUER, token_endpoint=None), "no token_endpoint"),
        (discovery_doc(ISSUER, code_challenge_methods_supported=["plain"]), "S256"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_discovery(body, ISSUER)
    assert discovery_url("https://id.example.com/") == (
        "https://id.example.com/.well-known/openid-configuration"
    )


class FakeIssuer:
    def __init__(self) -> None:
        self.answers: list = []
        self.calls: list[str] = []

    async def get(self, url: str, timeout: float):
        self.calls.append(url)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest_twisted.ensureDeferred
async def test_discovery_retries_keeps_the_last_good_answer_and_says_little():
    clock = task.Clock()
    issuer = FakeIssuer()
    discovery = OIDCDiscovery(ISSUER, http_get=issuer.get, clock=clock, retry_interval=30)
    issuer.answers.append(ConnectionRefusedError("10.1.2.3:443 refused"))
    discovery.start()
    with pytest.raises(DiscoveryUnavailable) as caught:
        await discovery.endpoints()
    assert "10.1.2.3" not in str(caught.value)  # details go to the log only
    assert len(issuer.calls) == 1  # no new attempt within the retry interval
    clock.advance(30)
    issuer.answers.append((200, discovery_doc(ISSUER)))
    assert (await discovery.endpoints()).authorization_endpoint.endswith("/authorize")
    assert len(issuer.calls) == 2
    # an hour later a refresh runs in the background; its failure keeps the old answer
    clock.advance(3601)
    issuer.answers.append((500, b"oops"))
    assert (await discovery.endpoints()).token_endpoint.endswith("/oauth/token")
    assert len(issuer.calls) == 3
    assert (await discovery.endpoints()) is not None


@pytest_twisted.ensureDeferred
async def test_sign_in_options_need_a_client_id():
    clock = task.Clock()
    oidc = OIDCConfig(issuer=ISSUER, audience="api", jwks_url=ISSUER + "jwks", client_id=None)
    options = SignInOptions(admin_token=False, oidc=oidc, discovery=None, reactor=clock)
    assert (await options.describe())["oidc"] is None
    assert await options.connect_sources() == []
