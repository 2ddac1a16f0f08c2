"""The dashboard in a real headless Chromium against a real ``twistd lectr``
on a real PostgreSQL, with the fake provider and a local OIDC issuer (each in
its own process, on loopback).

Without Chromium these tests are skipped, with the reason; with
``LECTR_REQUIRE_BROWSER=1`` (CI) a missing browser fails them instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg2
import pytest

from lectr.storage.request_logs import add_rollups_sql
from tests.e2e.conftest import ADMIN_TOKEN, FakeProviderProcess, Stack, free_port, start_stack
from tests.support.browser import Browser, missing_browser, origin
from tests.support.fake_provider import OPENAI_KEY
from tests.support.process import REPO


@pytest.fixture(scope="session", autouse=True)
def chromium_available():
    reason = missing_browser()
    if reason is None:
        return
    if os.environ.get("LECTR_REQUIRE_BROWSER"):
        pytest.fail(f"LECTR_REQUIRE_BROWSER is set but {reason}", pytrace=False)
    pytest.skip(f"no browser: {reason}")


class IssuerProcess:
    """tests/support/oidc.py's issuer in its own process (no reactor runs in
    these synchronous tests)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.oidc", "--port", str(self.port)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert "oidc issuer on" in line, line

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        from tests.support.oidc import AUDIENCE, CLIENT_ID

        return {
            "LECTR_OIDC_ISSUER": self.origin + "/",
            "LECTR_OIDC_AUDIENCE": AUDIENCE,
            "LECTR_OIDC_JWKS_URL": self.origin + "/.well-known/jwks.json",
            "LECTR_OIDC_CLIENT_ID": CLIENT_ID,
        }

    def _call(self, path: str, body: dict | None = None):
        request = urllib.request.Request(
            self.origin + path,
            data=json.dumps(body).encode() if body is not None else None,
            method="POST" if body is not None else "GET",
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())

    def token(self, sub: str, **claims) -> str:
        return self._call("/_control/token", {"sub": sub, **claims})["token"]

    def exchanges(self) -> list[dict]:
        return self._call("/_control/exchanges")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Dash:
    """The running stack: Lectr (with its database URL), the fake provider,
    the issuer; ``stack`` has the CLI and org helpers of the e2e tests."""

    stack: Stack
    issuer: IssuerProcess
    db_url: str

    @property
    def admin(self) -> str:
        return self.stack.admin

    def sql(self, statement: str, args=None) -> list[tuple]:
        conn = psycopg2.connect(self.db_url)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(statement, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def new_org(self, name: str | None = None) -> tuple[str, str]:
        """An org with an OpenAI key (id, its first Lectr key)."""
        created = self.stack.cli_json("orgs", "create", name or f"org-{uuid.uuid4().hex[:6]}")
        org_id = created["org"]["id"]
        self.stack.cli(
            "provider-keys",
            "add",
            org_id,
            "openai",
            "--key-env",
            "E2E_PROVIDER_KEY",
            env={"E2E_PROVIDER_KEY": OPENAI_KEY},
        )
        return org_id, created["key"]["key"]

    def add_provider_key(self, org_id: str, provider: str, *options: str) -> dict:
        """A key the fake provider accepts (OpenAI's), for ``provider``."""
        return self.stack.cli_json(
            "provider-keys",
            "add",
            org_id,
            provider,
            "--key-env",
            "E2E_PROVIDER_KEY",
            *options,
            env={"E2E_PROVIDER_KEY": OPENAI_KEY},
        )

    def custom_provider(self) -> str:
        """A new custom provider of the catalogue (OpenAI dialect) that the
        fake provider answers; its name."""
        name = f"backup-{uuid.uuid4().hex[:6]}"
        self.stack.cli(
            "catalogue",
            "set",
            name,
            "--dialect",
            "openai",
            "--base-url",
            self.stack.fake.origin + "/openai",
        )
        return name

    def seed_requests(
        self, org_id: str, count: int, *, key_id: str | None = None, spacing_s: float = 7.0
    ) -> datetime:
        """``count`` request-log rows, newest now, one every ``spacing_s``
        seconds back: three models, some 429 and 500, with their hourly
        rollups (as the recorder writes them). Returns the newest time."""
        now = datetime.now(UTC)
        self.sql(
            "WITH seeded AS ("
            "INSERT INTO request_logs (request_id, created_at, org_id, key_id, provider, model, "
            " method, path, status, latency_ms, ttfb_ms, streamed, prompt_tokens, "
            " completion_tokens, total_tokens, cached_tokens, usage_source, error_type) "
            "SELECT gen_random_uuid(), %s - i * %s * interval '1 second', %s, %s, 'openai', "
            " (ARRAY['gpt-4o-mini', 'gpt-4o', 'o3-mini'])[1 + i %% 3], 'POST', "
            " '/v1/chat/completions', "
            " CASE WHEN i %% 50 = 0 THEN 500 WHEN i %% 17 = 0 THEN 429 ELSE 200 END, "
            " 100 + i %% 900, 20 + i %% 100, i %% 2 = 0, 10 + i %% 90, 5 + i %% 40, "
            " 15 + i %% 90 + i %% 40, 0, 'provider', "
            " CASE WHEN i %% 50 = 0 THEN 'upstream' END "
            "FROM generate_series(0, %s - 1) AS i RETURNING *"
            f") {add_rollups_sql('seeded')}",
            (now, spacing_s, org_id, key_id, count),
        )
        return now


@pytest.fixture(scope="session")
def dash(pg_server, tmp_path_factory):
    name, url = pg_server.create_database()
    workdir = tmp_path_factory.mktemp("dashboard")
    fake = FakeProviderProcess()
    issuer = IssuerProcess()
    try:
        lectr = start_stack(url, workdir, fake, **issuer.env())
    except BaseException:
        fake.stop()
        issuer.stop()
        raise
    try:
        yield Dash(Stack(lectr, fake), issuer, url)
    finally:
        lectr.stop_cleanly()
        fake.stop()
        issuer.stop()
        pg_server.drop_database(name)
    assert ADMIN_TOKEN not in lectr.output and OPENAI_KEY not in lectr.output


@pytest.fixture
def browser(dash):
    """A fresh Chromium (new profile). After the test: no console error and
    no request to a host other than the admin port (and the issuer, for a
    test that signs in with it)."""
    b = Browser(dash.admin)
    try:
        yield b
        problems = b.problems()
        assert not problems, "\n".join(problems)
    finally:
        b.close()


def allow_issuer(browser: Browser, dash: Dash) -> None:
    browser.allowed_origins.add(origin(dash.issuer.origin))
