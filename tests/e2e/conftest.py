"""End-to-end fixtures: a real ``twistd lectr`` process, a fake provider in
its own process (loopback only; it checks the provider key it receives), the
real ``lectr`` CLI, and the official SDKs. These tests are synchronous: no
reactor runs in the test process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.fake_provider import ANTHROPIC_KEY, OPENAI_KEY
from tests.support.process import REPO, LectrProcess, base_env, new_master_key

ADMIN_TOKEN = "e2e-admin-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeProviderProcess:
    def __init__(self) -> None:
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_provider", "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.calls()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("fake provider did not start") from None
                time.sleep(0.05)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _control(self, action: str, body: dict | None = None):
        req = urllib.request.Request(
            f"{self.origin}/_control/{action}",
            data=json.dumps(body).encode() if body is not None else None,
            method="POST" if body is not None or action != "calls" else "GET",
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def calls(self) -> list[dict]:
        return self._control("calls")

    def reset(self) -> None:
        self._control("reset", {})

    def next(self, **script) -> None:
        """Answer the next request with this script (status, body, headers,
        ...: tests/support/fake_provider.py's Script) instead of the default."""
        self._control("next", script)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Org:
    id: str
    name: str
    key: str


@dataclass
class Stack:
    lectr: LectrProcess
    fake: FakeProviderProcess
    env: dict = field(default_factory=dict)

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.lectr.ports['proxy']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.lectr.ports['admin']}"

    def cli(
        self, *args: str, stdin: str | None = None, env: dict | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "LECTR_ADMIN_URL": self.admin,
            "LECTR_ADMIN_TOKEN": ADMIN_TOKEN,
            **(env or {}),
        }
        out = subprocess.run(
            [sys.executable, "-c", "from lectr.cli import main; main()", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=full_env,
            timeout=60,
        )
        if check:
            assert out.returncode == 0, f"lectr {' '.join(args)}: {out.stderr}"
        return out

    def cli_json(self, *args: str, **kwargs):
        return json.loads(self.cli("--json", *args, **kwargs).stdout)

    def new_org(self, providers=("openai", "anthropic")) -> Org:
        name = f"e2e-{uuid.uuid4().hex[:8]}"
        created = self.cli_json("orgs", "create", name)
        org = Org(created["org"]["id"], name, created["key"]["key"])
        keys = {"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY}
        for provider in providers:
            self.cli(
                "provider-keys",
                "add",
                org.id,
                provider,
                "--key-env",
                "E2E_PROVIDER_KEY",
                env={"E2E_PROVIDER_KEY": keys[provider]},
            )
        return org

    def upstream_calls(self, path: str | None = None) -> list[dict]:
        return [c for c in self.fake.calls() if path is None or c["path"] == path]


def start_stack(db_url: str, workdir: Path, fake: FakeProviderProcess, **env: str) -> LectrProcess:
    settings = {
        "DATABASE_URL": db_url,
        "ENCRYPTION_KEY": env.pop("ENCRYPTION_KEY", None) or new_master_key(),
        "LECTR_ADMIN_TOKEN": ADMIN_TOKEN,
        "LECTR_OPENAI_BASE_URL": fake.origin + "/openai",
        "LECTR_ANTHROPIC_BASE_URL": fake.origin + "/anthropic",
        "LECTR_DATA_DIR": str(workdir / "data"),
        **env,
    }
    proc = LectrProcess(base_env(**settings), cwd=workdir)
    proc.wait_ready()
    return proc


@pytest.fixture(scope="module")
def fake():
    f = FakeProviderProcess()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def stack(pg_server, fake, tmp_path_factory):
    name, url = pg_server.create_database()
    workdir = tmp_path_factory.mktemp("e2e")
    lectr = start_stack(url, workdir, fake)
    yield Stack(lectr, fake)
    lectr.stop_cleanly()
    pg_server.drop_database(name)


def eventually(predicate, timeout: float = 5.0, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(step)
