"""The ``lectr`` CLI end to end: the real ``twistd lectr`` in a subprocess,
the fake provider in another, and the CLI run with subprocess.run (plain
tests: no reactor is blocked by these synchronous calls)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from tests.support.fake_provider import OPENAI_KEY
from tests.support.process import (
    REPO,
    FakeProviderProcess,
    LectrProcess,
    base_env,
    free_port,
    new_master_key,
)

pytestmark = pytest.mark.e2e

TOKEN = "cli-test-admin-token-0123456789"


class Gateway:
    """A running Lectr process and a way to run the CLI against it."""

    def __init__(self, lectr: LectrProcess, tmp: Path) -> None:
        self.lectr = lectr
        self.tmp = tmp

    @property
    def admin_url(self) -> str:
        return self.lectr.url("admin", "")

    def env(self, **overrides: str | None) -> dict[str, str]:
        env = base_env(LECTR_ADMIN_URL=self.admin_url, LECTR_ADMIN_TOKEN=TOKEN)
        env["LECTR_DATA_DIR"] = str(self.tmp / "no-such-dir")
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(self, *args: str, input: str | None = None, **env) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", "from lectr.cli import main; main()", *args],
            env=self.env(**env),
            cwd=self.tmp,
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ok(self, *args: str, input: str | None = None, **env) -> str:
        out = self.run(*args, input=input, **env)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        assert out.stderr == "", out.stderr
        return out.stdout

    def json(self, *args: str, input: str | None = None) -> dict:
        return json.loads(self.ok(*args, "--json", input=input))

    def fails(self, code: int, *args: str, **env) -> str:
        out = self.run(*args, **env)
        assert out.returncode == code, (args, out.returncode, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lectr: "), out.stderr
        assert "Traceback" not in out.stderr
        return lines[0]

    def proxy(self, path: str, body: dict, key: str) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.lectr.url("proxy", path),
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def gateway(pg_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    name, db_url = pg_server.create_database()
    fake = FakeProviderProcess()
    lectr = LectrProcess(
        base_env(
            DATABASE_URL=db_url,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_ADMIN_TOKEN=TOKEN,
            LECTR_OPENAI_BASE_URL=fake.origin + "/openai",
            LECTR_ANTHROPIC_BASE_URL=fake.origin + "/anthropic",
            LECTR_DATA_DIR=str(tmp / "data"),
        ),
        cwd=tmp,
    )
    try:
        lectr.wait_ready()
        yield Gateway(lectr, tmp)
    finally:
        lectr.stop()
        fake.stop()
        pg_server.drop_database(name)
    for secret in (TOKEN, OPENAI_KEY):
        assert secret not in lectr.output


def eventually(predicate, timeout: float = 10.0) -> bool:
    """True once ``predicate()`` holds (changes reach the proxy's caches
    through notifications: not instantly, but without any restart)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def test_a_newcomer_sets_up_an_org_and_sees_its_requests(gateway):
    """The issue's "done when": create an org, add an OpenAI key, allow a
    model, run a request through the proxy, see it in `lectr requests`."""
    created = gateway.ok("orgs", "create", "acme")
    assert "Created organization acme" in created and "shown this once" in created
    key = next(w for w in created.split() if w.startswith("lc_"))

    added = gateway.ok("provider-keys", "add", "acme", "openai", input=OPENAI_KEY + "\n")
    assert f"…{OPENAI_KEY[-4:]}" in added and OPENAI_KEY not in added

    allowed = gateway.ok("providers", "set", "acme", "openai", "--allow", "gpt-4o-mini")
    assert "gpt-4o-mini" in allowed

    status, body = gateway.proxy("/v1/chat/completions", chat("gpt-4o-mini"), key)
    assert status == 200, body
    status, body = gateway.proxy("/v1/chat/completions", chat("gpt-4o"), key)
    assert status == 403, body

    deadline = time.monotonic() + 30
    while True:
        page = gateway.json("requests", "acme")
        if len(page["items"]) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    statuses = sorted((r["model"], r["status"]) for r in page["items"])
    assert statuses == [("gpt-4o", 403), ("gpt-4o-mini", 200)], page
    table = gateway.ok("requests", "acme")
    assert "gpt-4o-mini" in table and "200" in table.split()
    assert gateway.json("requests", "acme", "--status", "4xx")["items"][0]["status"] == 403

    usage = gateway.json("usage", "acme", "--by", "model")
    assert {t["key"]: t["requests"] for t in usage["items"]} == {"gpt-4o-mini": 1, "gpt-4o": 1}
    assert "gpt-4o-mini" in gateway.ok("usage", "acme")


def test_prices_and_the_cost_of_a_request_explained(gateway):
    """`lectr pricing` sets a price every node uses; a request proxied after
    it is priced with it; `lectr usage --explain` shows the tokens, the
    prices (with their date) and the arithmetic; `lectr usage` the cost."""
    shipped = gateway.json(
        "pricing", "list", "--provider", "openai", "--model", "gpt-4o-2024-08-06"
    )
    assert [(p["model"], p["source"], p["input"]) for p in shipped["items"]] == [
        ("gpt-4o", "catalogue", "2.5")
    ]
    table = gateway.ok("pricing", "list", "--provider", "anthropic")
    assert "claude-sonnet-4-5" in table and ">200,000: $6 / $22.5" in table

    set_out = gateway.ok(
        "pricing", "set", "openai", "gpt-4o-mini", "--input", "1.5", "--output", "2",
        "--cached-input", "0.5", "--checked", "2026-01-02", "--note", "negotiated",
    )  # fmt: skip
    assert "override" in set_out and "$1.5" in set_out
    org = gateway.json("orgs", "create", "Initech")
    key = org["key"]["key"]
    gateway.ok("provider-keys", "add", "Initech", "openai", input=OPENAI_KEY + "\n")
    status, body = gateway.proxy("/v1/chat/completions", chat("gpt-4o-mini"), key)
    assert status == 200, body
    usage = body["usage"]

    def logged():
        return gateway.json("requests", "Initech")["items"]

    assert eventually(logged, 30)
    [row] = logged()
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    expected = Decimal(prompt) * Decimal("1.5") / 10**6 + Decimal(completion) * 2 / 10**6
    assert Decimal(row["cost_usd"]) == expected

    explained = gateway.json("usage", "--explain", row["request_id"])
    assert explained["matches"] is True and explained["total_usd"] == row["cost_usd"]
    assert explained["pricing"]["source"] == "override"
    assert explained["pricing"]["checked"] == "2026-01-02"
    assert json.loads(explained["usage_raw"]) == usage
    human = gateway.ok("usage", "--explain", row["request_id"])
    assert "override price, checked 2026-01-02" in human
    assert f"{prompt} tokens x $1.5/M" in human and "matches the recorded cost" in human

    by_key = gateway.json("usage", "Initech", "--by", "key")
    assert [(t["key"], t["requests"], t["cost_usd"]) for t in by_key["items"]] == [
        (org["key"]["id"], 1, row["cost_usd"])
    ]
    assert row["cost_usd"] in gateway.ok("usage", "Initech", "--by", "hour")

    unset = gateway.ok("pricing", "unset", "openai", "gpt-4o-mini")
    assert "now priced as" in unset and "catalogue" in unset
    assert "unpriced" in gateway.ok("pricing", "list", "--provider", "openai", "--model", "gpt-9")
    assert "no price override" in gateway.fails(1, "pricing", "unset", "openai", "gpt-4o-mini")
    assert "decimals" in gateway.fails(
        1, "pricing", "set", "openai", "m", "--input", "0.0000001", "--output", "1"
    )
    assert "request id" in gateway.fails(2, "usage", "--explain", "not-a-uuid")
    assert "not found" in gateway.fails(1, "usage", "--explain", str(uuid.uuid4()))
    assert "--explain" in gateway.fails(2, "usage")


def test_orgs_and_keys(gateway):
    org = gateway.json("orgs", "create", "Globex", "--key-name", "first")["org"]
    assert org["name"] == "Globex"
    listing = gateway.ok("orgs", "list")
    assert listing.splitlines()[0].split() == ["ID", "NAME", "ENABLED", "ROLE", "CREATED"]
    assert org["id"] in listing
    assert "Globex" in gateway.ok("orgs", "show", org["id"])
    assert gateway.json("orgs", "rename", "Globex", "Globex Corp")["name"] == "Globex Corp"
    assert gateway.json("orgs", "disable", "Globex Corp")["enabled"] is False
    assert gateway.json("orgs", "enable", org["id"])["enabled"] is True

    named = gateway.json("keys", "create", org["id"], "--name", "ci")
    assert named["key"].startswith("lc_")
    keys = gateway.json("keys", "list", org["id"])["items"]
    assert {k["name"] for k in keys} == {"first", "ci"}
    assert named["key"] not in gateway.ok("keys", "list", org["id"])
    gateway.ok("keys", "revoke", org["id"], named["id"])
    active = [k["name"] for k in gateway.json("keys", "list", org["id"])["items"] if k["active"]]
    assert active == ["first"]

    # the kill switch and key rotation, seen from the proxy
    first_key = gateway.json("keys", "create", org["id"], "--name", "app")["key"]
    gateway.ok("provider-keys", "add", org["id"], "openai", input=OPENAI_KEY)
    assert gateway.proxy("/v1/chat/completions", chat("gpt-4o-mini"), first_key)[0] == 200
    gateway.ok("orgs", "disable", org["id"])
    assert eventually(lambda: gateway.proxy("/v1/chat/completions", chat("x"), first_key)[0] == 403)
    gateway.ok("orgs", "enable", org["id"])
    assert eventually(lambda: gateway.proxy("/v1/chat/completions", chat("x"), first_key)[0] == 200)

    rotated = gateway.ok("orgs", "rotate-key", org["id"])
    assert "lc_" in rotated and "revoked" in rotated
    new_key = next(w for w in rotated.split() if w.startswith("lc_"))
    assert len([k for k in gateway.json("keys", "list", org["id"])["items"] if k["active"]]) == 1
    assert eventually(lambda: gateway.proxy("/v1/chat/completions", chat("x"), first_key)[0] == 401)
    assert gateway.proxy("/v1/chat/completions", chat("gpt-4o-mini"), new_key)[0] == 200

    assert "not deleted" not in gateway.fails(2, "orgs", "delete", org["id"])  # needs --yes
    gateway.ok("orgs", "delete", org["id"], "--yes")
    gateway.fails(1, "orgs", "show", org["id"])


def test_org_names_are_unique_so_a_name_names_one_org(gateway):
    org = gateway.json("orgs", "create", "Umbrella")["org"]
    line = gateway.fails(1, "orgs", "create", "UMBRELLA")
    assert "already exists" in line and "name_taken" in line
    other = gateway.json("orgs", "create", "Umbrella Two")["org"]
    assert "already exists" in gateway.fails(1, "orgs", "rename", other["id"], "umbrella")
    # any case names the org; the other org is untouched
    disabled = gateway.json("orgs", "disable", "umbrella")
    assert (disabled["id"], disabled["enabled"]) == (org["id"], False)
    assert gateway.json("orgs", "show", other["id"])["enabled"] is True
    assert gateway.json("orgs", "enable", "  Umbrella ")["enabled"] is True
    for ref in (org["id"], other["id"]):
        gateway.ok("orgs", "delete", ref, "--yes")


def test_provider_keys_providers_members_users_rotation(gateway):
    org = gateway.json("orgs", "create", "Initrode")["org"]["id"]
    out = gateway.run(
        "provider-keys",
        "add",
        org,
        "openai",
        "--key-env",
        "THE_KEY",
        "--json",
        THE_KEY=OPENAI_KEY,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["last4"] == OPENAI_KEY[-4:] and OPENAI_KEY not in out.stdout
    refused = gateway.run("provider-keys", "add", org, "openai", input="sk-not-a-real-key-0000\n")
    assert refused.returncode == 1 and "refused" in refused.stderr
    assert "sk-not-a-real-key" not in refused.stderr
    assert "…" + OPENAI_KEY[-4:] in gateway.ok("provider-keys", "list", org)
    gateway.ok("provider-keys", "delete", org, info["id"])
    assert gateway.json("provider-keys", "list", org)["items"] == []

    gateway.ok("providers", "set", org, "anthropic", "--disable", "--block", "claude-2*")
    providers = {p["provider"]: p for p in gateway.json("providers", "list", org)["items"]}
    assert providers["anthropic"]["enabled"] is False
    assert providers["anthropic"]["blocked_models"] == ["claude-2*"]
    gateway.ok("providers", "set", org, "anthropic", "--enable", "--unblock-all")
    gateway.fails(2, "providers", "set", org, "anthropic")  # nothing to change

    member = gateway.json("members", "add", org, "--subject", "auth0|zoe", "--role", "admin")
    assert member["role"] == "admin"
    assert "auth0|zoe" in gateway.ok("members", "list", org)
    users = gateway.json("users", "list")["items"]
    zoe = next(u for u in users if u["subject"] == "auth0|zoe")
    assert gateway.json("users", "grant-admin", zoe["id"])["is_admin"] is True
    assert gateway.json("users", "revoke-admin", zoe["id"])["is_admin"] is False
    gateway.ok("members", "remove", org, member["user_id"])
    assert gateway.json("members", "list", org)["items"] == []

    status = gateway.json("rotation", "status")
    assert status["next_kek"] is None and status["done"] is True
    assert "current master key" in gateway.ok("rotation", "status")
    assert gateway.json("me")["kind"] == "token"


def test_usage_by_hour_and_by_key_with_totals(gateway):
    created = gateway.json("orgs", "create", "hourly")
    key = created["key"]["key"]
    gateway.ok("provider-keys", "add", "hourly", "openai", input=OPENAI_KEY + "\n")
    for model in ("gpt-4o-mini", "gpt-4o", "gpt-4o-mini"):
        assert gateway.proxy("/v1/chat/completions", chat(model), key)[0] == 200
    assert eventually(lambda: len(gateway.json("requests", "hourly")["items"]) == 3)

    by_hour = gateway.json("usage", "hourly", "--by", "hour")
    assert by_hour["group_by"] == "hour"
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00:00Z", t["key"]) for t in by_hour["items"])
    by_key = gateway.json("usage", "hourly", "--by", "key")
    assert [(t["key"], t["requests"]) for t in by_key["items"]] == [(created["key"]["id"], 3)]
    for by in ("model", "provider", "key", "day", "hour"):
        table = gateway.ok("usage", "hourly", "--by", by).splitlines()
        total = next(line.split() for line in table if line.startswith("(total)"))
        assert total[1:3] == ["3", "0"], (by, table)  # 3 requests, 0 errors, whatever the grouping
    assert gateway.json("requests", "hourly", "--key-id", created["key"]["id"])["items"]
    assert gateway.json("requests", "hourly", "--key-id", str(uuid.uuid4()))["items"] == []


def test_follow_prints_json_lines(gateway):
    org = gateway.json("orgs", "create", "Followed")
    key = org["key"]["key"]
    gateway.run("provider-keys", "add", org["org"]["id"], "openai", input=OPENAI_KEY)
    for _ in range(2):
        assert gateway.proxy("/v1/chat/completions", chat("gpt-4o-mini"), key)[0] == 200
    lines: list[dict] = []
    deadline = time.monotonic() + 30
    while len(lines) < 2 and time.monotonic() < deadline:
        out = gateway.ok(
            "requests",
            org["org"]["id"],
            "--follow",
            "--json",
            "--interval",
            "0.2",
            "--max-polls",
            "3",
        )
        lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2
    assert lines[0]["created_at"] <= lines[1]["created_at"]  # oldest first, as they come
    human = gateway.ok("requests", org["org"]["id"], "-f", "--interval", "0.1", "--max-polls", "1")
    assert human.splitlines()[0].split()[:3] == ["TIME", "PROVIDER", "MODEL"]
    assert human.count("gpt-4o-mini") == 2


def test_errors_are_one_line_with_an_exit_code(gateway, tmp_path):
    line = gateway.fails(4, "orgs", "list", LECTR_ADMIN_TOKEN="wrong-token-000000000")
    assert "HTTP 401" in line
    line = gateway.fails(4, "orgs", "list", LECTR_ADMIN_TOKEN=None)
    assert "no admin token" in line
    line = gateway.fails(3, "orgs", "list", LECTR_ADMIN_URL=f"http://127.0.0.1:{free_port()}")
    assert "cannot reach the admin API" in line
    line = gateway.fails(1, "orgs", "show", "no-such-org")
    assert "no organization named 'no-such-org'" in line
    line = gateway.fails(1, "orgs", "show", str(uuid.uuid4()))
    assert "HTTP 404" in line
    line = gateway.fails(1, "orgs", "create", "x" * 300)
    assert "HTTP 400" in line
    line = gateway.fails(2, "orgs", "list", LECTR_ADMIN_URL="ftp://example.com")
    out = gateway.run("orgs", "frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_development_token_file(gateway, tmp_path):
    data = tmp_path / "devdata"
    data.mkdir()
    (data / "admin.token").write_text(TOKEN + "\n")
    os.chmod(data / "admin.token", 0o600)
    out = gateway.run("me", "--json", LECTR_ADMIN_TOKEN=None, LECTR_DATA_DIR=str(data))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["kind"] == "token"


def test_the_console_script_is_declared():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert "lectr = lectr.cli:main" in cfg["options.entry_points"]["console_scripts"]
    from lectr.cli import main

    assert callable(main)
    help_text = subprocess.run(
        [sys.executable, "-c", "from lectr.cli import main; main()", "--help"],
        env=base_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for group in (
        "orgs",
        "keys",
        "provider-keys",
        "providers",
        "requests",
        "usage",
        "pricing",
        "rotation",
    ):
        assert group in help_text


def test_global_options_go_before_or_after_the_command():
    from lectr.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--json", "orgs", "list"]).json is True
    assert parser.parse_args(["orgs", "list", "--json"]).json is True
    assert parser.parse_args(["orgs", "list"]).json is False
    assert parser.parse_args(["--url", "http://a:1", "me"]).url == "http://a:1"
    assert parser.parse_args(["me", "--url", "http://b:2"]).url == "http://b:2"


def test_version():
    from lectr import __version__

    for command in (
        [sys.executable, "-c", "from lectr.cli import main; main()", "--version"],
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "lectr",
            "--version",
        ],
    ):
        done = subprocess.run(command, env=base_env(), cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().lower() == f"lectr {__version__}", done.stdout
