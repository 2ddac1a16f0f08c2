"""The ``lectr`` CLI: admin API URLs it must refuse in one line (exit 2,
never a traceback, never repeating a password), and command-line values
that go into a URL path (always one quoted segment)."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lectr.cli import EXIT_API, EXIT_USAGE, run

TOKEN = "cli-review-admin-token-0123456789"
ORG = "0f644c25-3168-4fca-a4b6-0d676c77d310"


def lectr(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        code = run(list(argv), environ={"LECTR_ADMIN_TOKEN": TOKEN}, out=out, err=err)
    except SystemExit as e:
        code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:notaport",  # http.client: InvalidURL
        "http://[::1",  # urlsplit: ValueError
        "http://127.0.0.1:99999999",  # port out of range
        "http://a b:8081",  # http.client: InvalidURL
        "http://127.0.0.1:8081/pre fix",
        "http://127.0.0.1:8081/?x=1",  # the paths would go into the query
        "http://127.0.0.1:8081/#x",
    ],
)
def test_a_malformed_admin_url_is_a_usage_error_in_one_line(url):
    code, out, err = lectr("--url", url, "orgs", "list")
    assert code == EXIT_USAGE, err
    assert out == ""
    assert err.startswith("lectr: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_an_admin_url_with_a_password_is_refused_without_repeating_it():
    code, out, err = lectr("--url", "http://admin:s3cret-pass@127.0.0.1:1", "orgs", "list")
    assert code == EXIT_USAGE, err
    assert err.startswith("lectr: ") and err.count("\n") == 1, err
    assert "s3cret-pass" not in err and "s3cret-pass" not in out


class _Recorder(BaseHTTPRequestHandler):
    paths: list[str] = []

    def _answer(self) -> None:
        type(self).paths.append(self.path)
        body = b'{"error": {"code": "not_found", "message": "recorded"}}'
        self.send_response(404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_DELETE = do_PUT = do_POST = do_PATCH = do_GET = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def admin_api():
    _Recorder.paths = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", _Recorder.paths
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["keys", "revoke", ORG, "a b"], f"/admin/orgs/{ORG}/keys/a%20b"),
        (["keys", "revoke", ORG, "abc?x=1"], f"/admin/orgs/{ORG}/keys/abc%3Fx%3D1"),
        (["keys", "revoke", ORG, "../../x"], f"/admin/orgs/{ORG}/keys/..%2F..%2Fx"),
        (["provider-keys", "delete", ORG, "k#1"], f"/admin/orgs/{ORG}/provider-keys/k%231"),
        (["members", "remove", ORG, "u 1"], f"/admin/orgs/{ORG}/members/u%201"),
        (["users", "revoke-admin", "a/b"], "/admin/users/a%2Fb"),
        (["catalogue", "delete", "x?y"], "/admin/providers/x%3Fy"),
    ],
)
def test_values_in_a_path_are_one_quoted_segment(admin_api, argv, expected):
    url, paths = admin_api
    code, _, err = lectr("--url", url, *argv)
    assert "Traceback" not in err
    assert paths == [expected]
    assert (code, err) == (EXIT_API, "lectr: recorded (HTTP 404, not_found)\n")


# --- requests --follow ------------------------------------------------------------------


class _FakeRequestLog:
    """The admin API's request listing, as lectr/managers/usage.py answers
    it: newest first (``limit``), or with ``after`` (a ``live_cursor``) the
    rows stored since, oldest first; ``arrive(n)`` stores n more rows."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.calls: list[dict] = []
        self.on_call = lambda call_number: None

    def arrive(self, n: int) -> None:
        for _ in range(n):
            i = len(self.rows) + 1
            self.rows.append(
                {
                    "id": i,
                    "request_id": f"00000000-0000-4000-8000-{i:012d}",
                    "created_at": f"2026-12-05T10:{i // 600:02d}:{i // 10 % 60:02d}.{i:06d}Z",
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "status": 200,
                    "latency_ms": 1.0,
                    "prompt_tokens": 1,
                    "completion_tokens": 1,
                    "streamed": False,
                }
            )

    def get(self, path: str, **query) -> dict:
        self.calls.append(query)
        self.on_call(len(self.calls))
        limit = int(query.get("limit") or 50)
        assert 1 <= limit <= 200, limit  # the API refuses more
        last = self.rows[-1]["id"] if self.rows else 0
        after = query.get("after")
        if after is None:
            items = list(reversed(self.rows[-limit:]))
            position = last
        else:
            start = int(after.removeprefix("live:"))
            items = [r for r in self.rows if r["id"] > start][:limit]
            position = items[-1]["id"] if len(items) == limit else max(start, last)
        return {"items": items, "next_cursor": None, "live_cursor": f"live:{position}"}


def test_follow_prints_every_request_of_a_burst(monkeypatch):
    """300 requests logged between two polls (150 a second at the default
    interval) are all printed, once each, oldest first; not only the newest
    page of them."""
    from lectr.cli import Commands, Output, build_parser

    log = _FakeRequestLog()
    log.arrive(3)

    def burst(call_number: int) -> None:
        if call_number == 2:
            log.arrive(300)

    log.on_call = burst
    monkeypatch.setattr("lectr.cli.time.sleep", lambda s: None)
    out = io.StringIO()
    commands = Commands(log, Output(True, out))  # (the fake stands for the API client)
    args = build_parser().parse_args(["requests", ORG, "--follow", "--max-polls", "5"])
    commands.requests(args)
    printed = [json.loads(line)["id"] for line in out.getvalue().splitlines()]
    assert printed == list(range(1, 304))


class _HtmlPage(BaseHTTPRequestHandler):
    """What answers when LECTR_ADMIN_URL names the wrong thing (a sign-in
    page of a proxy in front of it, another web server): 200 and HTML."""

    def do_GET(self) -> None:
        body = b"<!doctype html><title>Sign in</title>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_an_answer_that_is_not_json_is_a_one_line_error():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HtmlPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, out, err = lectr("--url", f"http://127.0.0.1:{server.server_port}", "orgs", "list")
    finally:
        server.shutdown()
        server.server_close()
    assert code == EXIT_API, err
    assert out == ""
    assert err.startswith("lectr: ") and err.count("\n") == 1, err
    assert "not JSON" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_declining_to_delete_an_org_is_a_missing_confirmation(admin_api, monkeypatch):
    """docs/cli.md: exit status 2 is "bad command line, or a confirmation
    is missing"; 1 is kept for the API's refusals. Nothing is sent."""
    url, paths = admin_api
    monkeypatch.setattr("builtins.input", lambda prompt="": "n")
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exit_:
        run(
            ["--url", url, "orgs", "delete", ORG],
            environ={"LECTR_ADMIN_TOKEN": TOKEN},
            out=out,
            err=err,
            stdin=_Terminal(),
        )
    assert exit_.value.code == EXIT_USAGE, err.getvalue()
    assert err.getvalue() == "lectr: not deleted\n"
    assert paths == []


# --- twistd lectr's options ---------------------------------------------------------------


def test_workers_auto_stays_within_the_documented_range(monkeypatch):
    """docs/configuration.md: --workers is 1 to 256, or auto (one per
    core); a machine with more cores gets 256, not more."""
    from lectr.config import load_config

    monkeypatch.setattr("lectr.config.usable_cores", lambda: 384)
    assert load_config({"workers": "auto"}, {}).workers == 256
    monkeypatch.setattr("lectr.config.usable_cores", lambda: 1)
    assert load_config({}, {"LECTR_WORKERS": "auto"}).workers == 1


class _Refuser(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"error": {"code": "invalid_token", "message": "the token is not valid here"}}'
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_refused_development_token_names_the_file_it_came_from(tmp_path):
    """Without LECTR_ADMIN_TOKEN the CLI uses development mode's token file;
    a server that is not in development mode refuses it, and the message
    said nothing of where the token came from (a leftover .lectr/)."""
    from lectr.cli import EXIT_AUTH

    (tmp_path / "admin.token").write_text("dev-token-0123456789abcdef\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuser)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        for environ, named in (
            ({"LECTR_DATA_DIR": str(tmp_path)}, True),
            ({"LECTR_DATA_DIR": str(tmp_path), "LECTR_ADMIN_TOKEN": TOKEN}, False),
        ):
            out, err = io.StringIO(), io.StringIO()
            with pytest.raises(SystemExit) as exited:
                run(["--url", url, "me"], environ=environ, out=out, err=err)
            assert exited.value.code == EXIT_AUTH, err.getvalue()
            message = err.getvalue()
            assert (str(tmp_path / "admin.token") in message) is named, message
            assert "dev-token-0123456789abcdef" not in message and TOKEN not in message
    finally:
        server.shutdown()
        server.server_close()
