"""The ``lectr`` CLI, second review: text that providers and clients put in
the gateway's answers never drives the terminal (no escape sequence, no
forged line), and a token that cannot go in an HTTP header is refused in one
line without being repeated."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import unicodedata
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lectr.cli import EXIT_AUTH, Output, _fail, run
from tests.e2e.conftest import eventually, fake, stack  # noqa: F401 (fixtures)
from tests.support.fake_provider import OPENAI_KEY, openai_chat_completion
from tests.support.process import REPO

HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\r\nlectr: forged line\x9b1m\u202eevil"


def _terminal_controls(text: str) -> list[str]:
    """The characters of ``text`` a terminal acts on, other than the line
    breaks between lines."""
    return [
        c
        for c in text
        if c != "\n"
        and (unicodedata.category(c) == "Cc" or c in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e")
    ]


# --- the real gateway: a provider's words on the terminal ------------------------------


def test_a_served_model_with_escapes_is_shown_inert(stack):  # noqa: F811
    """A provider (or whatever answers on its base URL) names the model it
    served with escape sequences: `lectr usage --explain` shows them as
    text, not as commands to the terminal."""
    org = stack.new_org(providers=("openai",))
    stack.fake.next(body=json.dumps(openai_chat_completion("gpt-4o-mini" + HOSTILE)))
    request = urllib.request.Request(
        stack.proxy + "/v1/chat/completions",
        data=json.dumps(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        ).encode(),
        headers={"Authorization": f"Bearer {org.key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        request_id = response.headers["x-lectr-request-id"]
    eventually(lambda: stack.cli_json("requests", org.id)["items"], timeout=30)
    # the API keeps the provider's words as they were
    doc = stack.cli_json("usage", "--explain", request_id)
    assert doc["request"]["response_model"] == "gpt-4o-mini" + HOSTILE
    out = stack.cli("usage", "--explain", request_id).stdout
    assert _terminal_controls(out) == [], out
    assert "served: gpt-4o-mini\\x1b]0;owned\\x07" in out


def test_a_provider_refusal_with_escapes_is_one_inert_line(stack):  # noqa: F811
    """The provider's reason for refusing a key is part of the error
    `lectr provider-keys add` prints: one line on standard error, with the
    reason's escapes and line breaks shown as text."""
    org = stack.new_org(providers=())
    stack.fake.next(status=401, body=json.dumps({"error": {"message": "bad key" + HOSTILE}}))
    out = stack.cli(
        "provider-keys",
        "add",
        org.id,
        "openai",
        "--key-env",
        "E2E_PROVIDER_KEY",
        env={"E2E_PROVIDER_KEY": OPENAI_KEY},  # (the fake answers with the script)
        check=False,
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("lectr: ") and out.stderr.count("\n") == 1, out.stderr
    assert _terminal_controls(out.stderr) == [], out.stderr
    assert "bad key\\x1b]0;owned" in out.stderr


# --- every way text is printed -------------------------------------------------------------

_ANY_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(list("\x1b\x07\x00\r\n\t\x7f\x85\x9b\u2028\u2029\u202e\u2066")),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(_ANY_TEXT, min_size=1, max_size=4))
def test_printed_text_never_drives_the_terminal(values):
    """Whatever the API's strings hold, a table, a list of fields, a line
    and an error message print as many lines as they should, none holding
    a character the terminal would act on."""
    out = io.StringIO()
    printer = Output(False, out)
    rows = [{"v": v} for v in values]
    printer.table(rows, [("VALUE", lambda r: r["v"])])
    printer.fields([(f"f{i}", v) for i, v in enumerate(values)])
    for v in values:
        printer.line(f"Renamed to {v}")
    text = out.getvalue()
    assert text.count("\n") == 1 + len(values) + len(values) + len(values)
    assert _terminal_controls(text) == []

    err = io.StringIO()
    with pytest.raises(SystemExit):
        _fail(" ".join(values), EXIT_AUTH, err)
    assert err.getvalue().count("\n") == 1
    assert _terminal_controls(err.getvalue()) == []


def test_printable_text_is_printed_as_it_is():
    """Names in any script, emoji and punctuation are not escaped."""
    out = io.StringIO()
    Output(False, out).line("Zürich 東京 🚀 “quoted” — tab-free, back\\slash")
    assert out.getvalue() == "Zürich 東京 🚀 “quoted” — tab-free, back\\slash\n"


# --- a token that cannot be sent ---------------------------------------------------------------

SECRET = "cli-second-review-secret-0123456789"


def _cli(env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from lectr.cli import main; main()", "orgs", "list"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("LECTR_")},
            "PYTHONPATH": str(REPO),
            "LECTR_ADMIN_URL": "http://127.0.0.1:9",
            **env,
        },
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "token",
    [
        f"{SECRET}\nsecond-line",  # two lines pasted into the variable
        f"{SECRET}\rx",
        f"{SECRET}…",  # not ASCII: no admin API accepts it
    ],
)
def test_an_unusable_token_is_refused_without_repeating_it(tmp_path, token):
    from_env = _cli({"LECTR_ADMIN_TOKEN": token}, tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin.token").write_text(token)
    from_file = _cli({"LECTR_DATA_DIR": str(tmp_path / "data")}, tmp_path)
    for out, source in ((from_env, "LECTR_ADMIN_TOKEN"), (from_file, "admin.token")):
        assert out.returncode == EXIT_AUTH, out.stderr
        assert "Traceback" not in out.stderr
        assert SECRET not in out.stderr and SECRET not in out.stdout
        assert out.stderr.startswith("lectr: ") and out.stderr.count("\n") == 1, out.stderr
        assert source in out.stderr


def test_a_usable_token_still_reaches_the_api(tmp_path):
    """(The check refuses only what no header can carry: an OIDC access
    token, a JWT, passes.)"""
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl-_~+/="
    out, err = io.StringIO(), io.StringIO()
    try:
        code = run(
            ["--url", "http://127.0.0.1:9", "orgs", "list"],
            environ={"LECTR_ADMIN_TOKEN": jwt},
            out=out,
            err=err,
        )
    except SystemExit as e:
        code = e.code
    assert code == 3, err.getvalue()  # unreachable: it was sent
    assert "cannot reach the admin API" in err.getvalue()


# --- requests --follow ---------------------------------------------------------------------


@pytest.mark.parametrize("interval", ["nan", "inf", "-1", "0", "1e999"])
def test_an_interval_that_is_no_wait_is_a_usage_error(interval):
    """(time.sleep would raise on NaN and infinity, after the first page was
    printed: a traceback instead of a usage error.)"""
    err = io.StringIO()
    code = None
    try:
        run(
            ["requests", "acme", "--follow", "--interval", interval],
            environ={"LECTR_ADMIN_TOKEN": SECRET},
            out=io.StringIO(),
            err=err,
        )
    except SystemExit as e:
        code = e.code
    assert code == 2


def test_a_finite_interval_is_taken():
    from lectr.cli import build_parser

    args = build_parser().parse_args(["requests", "acme", "--follow", "--interval", "0.5"])
    assert args.interval == 0.5


# --- an answer that is not HTTP, or cut short ------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # LECTR_ADMIN_URL names another service's port
        (b"SSH-2.0-OpenSSH_9.2\r\n", (3, "lectr: cannot reach the admin API at ")),
        # cut short
        (
            b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"items"',
            (3, "lectr: cannot reach the admin API at "),
        ),
        # an error, cut short: its status line still says what happened
        (
            b'HTTP/1.1 404 Not Found\r\ncontent-length: 100\r\n\r\n{"error"',
            (1, "lectr: Not Found (HTTP 404, http_error)"),
        ),
    ],
)
def test_an_answer_that_is_not_http_or_cut_short_is_one_line(answer, expected):
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    out, err = io.StringIO(), io.StringIO()
    code = None
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        run(["--url", url, "orgs", "list"], environ={"LECTR_ADMIN_TOKEN": SECRET}, out=out, err=err)
    except SystemExit as e:
        code = e.code
    finally:
        thread.join(5)
        server.close()
    assert code == expected[0], err.getvalue()
    assert err.getvalue().startswith(expected[1])
    assert err.getvalue().count("\n") == 1 and SECRET not in err.getvalue()
