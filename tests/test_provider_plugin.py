"""A new provider is one new module: dropped into a ``lectr/providers/catalogue``
directory on the Python path (no other file edited), it is picked up by
every surface - its setting (LECTR_ACME_BASE_URL), its route, the policy,
metering and the request log, the admin API and its OpenAPI document, and
the CLI. Real twistd, real CLI, real HTTP, the fake provider in a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.support.process import FakeProviderProcess, LectrProcess, base_env, new_master_key

pytestmark = pytest.mark.e2e

TOKEN = "plugin-test-admin-token-0123456789"
ACME_KEY = "acme-key-0123456789abcdef"

MODULE = '''
"""Acme AI: a provider added as one module."""

from lectr.providers.base import Provider
from lectr.providers.dialects import OPENAI


class Acme(Provider):
    name = "acme"
    display_name = "Acme AI"
    dialect = OPENAI
    default_base_url = "https://api.acme.example"


PROVIDERS = [Acme]
'''


def _call(method: str, url: str, body=None, token: str | None = TOKEN) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method=method,
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_a_provider_is_one_module_and_every_surface_sees_it(tmp_path, pg_server):
    plugin_root = tmp_path / "plugins"
    catalogue = plugin_root / "lectr" / "providers" / "catalogue"
    catalogue.mkdir(parents=True)
    (catalogue / "acme.py").write_text(MODULE)
    pythonpath = str(plugin_root)

    fake = FakeProviderProcess()
    _call(
        "POST", fake.origin + "/_control/keys", {"acme": [ACME_KEY], "openai": [], "anthropic": []}
    )
    name, db_url = pg_server.create_database()
    env = base_env(
        DATABASE_URL=db_url,
        ENCRYPTION_KEY=new_master_key(),
        LECTR_ADMIN_TOKEN=TOKEN,
        LECTR_ACME_BASE_URL=fake.origin + "/acme",  # the module's own setting
        LECTR_DATA_DIR=str(tmp_path / "data"),
    )
    env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + pythonpath
    lectr = LectrProcess(env, cwd=tmp_path)

    def cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
        cli_env = {**env, "LECTR_ADMIN_URL": lectr.url("admin", ""), "ACME_SECRET": ACME_KEY}
        return subprocess.run(
            [sys.executable, "-c", "from lectr.cli import main; main()", *args],
            env=cli_env,
            cwd=tmp_path,
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        lectr.wait_ready()
        assert "acme " + fake.origin + "/acme" in lectr.output  # the base URLs logged at start-up
        admin = lectr.url("admin", "")

        # admin API and OpenAPI
        status, doc = _call("GET", admin + "/admin/providers")
        assert status == 200
        [acme] = [p for p in doc["items"] if p["name"] == "acme"]
        assert (acme["display_name"], acme["dialect"], acme["custom"]) == (
            "Acme AI",
            "openai",
            False,
        )
        status, spec = _call("GET", admin + "/admin/openapi.json", token=None)
        schema = spec["components"]["schemas"]["ProviderKey"]["properties"]["provider"]
        assert "acme" in schema["enum"]

        # CLI: help names it; a key is added (checked with the provider) through it
        help_text = cli("provider-keys", "add", "--help").stdout
        assert "acme" in help_text
        created = json.loads(cli("orgs", "create", "Acme Corp", "--json").stdout)
        org_id, lectr_key = created["org"]["id"], created["key"]["key"]
        added = cli("provider-keys", "add", org_id, "acme", "--key-env", "ACME_SECRET", "--json")
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["last4"] == ACME_KEY[-4:]

        # the route, the upstream credential, metering
        body = {"model": "acme-large", "messages": [{"role": "user", "content": "hi"}]}
        status, answer = _call(
            "POST", lectr.url("proxy", "/acme/v1/chat/completions"), body, lectr_key
        )
        assert status == 200 and answer["choices"][0]["message"]["content"] == "Hello!"
        calls = json.loads(urllib.request.urlopen(fake.origin + "/_control/calls").read())
        [sent] = [c for c in calls if c["path"] == "/v1/chat/completions"]
        assert sent["provider"] == "acme" and sent["headers"]["authorization"] == [
            f"Bearer {ACME_KEY}"
        ]

        # policy: the org disables it
        assert cli("providers", "set", org_id, "acme", "--disable").returncode == 0
        for _ in range(100):
            status, answer = _call(
                "POST", lectr.url("proxy", "/acme/v1/chat/completions"), body, lectr_key
            )
            if status == 403:
                break
        assert answer["error"]["message"] == "Acme AI is disabled for this organization."

        # the request log (and its usage) names it
        deadline = time.monotonic() + 10  # rows are written by the flusher, within a second
        while True:
            rows = json.loads(cli("requests", org_id, "--json").stdout)["items"]
            ok = [r for r in rows if r["status"] == 200]
            if ok or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ok and ok[0]["provider"] == "acme" and ok[0]["total_tokens"] == 17
    finally:
        lectr.stop()
        fake.stop()
        pg_server.drop_database(name)
    assert ACME_KEY not in lectr.output
