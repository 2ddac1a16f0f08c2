"""Canary: a provider key, once handed to Lectr, never shows up in a
database dump, a log event or an error body, whatever happens to it (stored,
used by the proxy, refused, echoed back by the provider, rewrapped)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.logger import formatEvent, globalLogPublisher

from lectr.managers.vault import check_key_format
from tests.support.fake_provider import FakeProviderServer, Script
from tests.support.lectr_service import admin_url, proxy_url, start_lectr
from tests.support.pg import admin_execute
from tests.support.process import new_master_key
from tests.test_vault import wait_for

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "test-admin-token-0123456789"  # what start_lectr configures


def canary(tag: str) -> str:
    return f"sk-test-canary-{tag}-{uuid.uuid4().hex}"


def forms(secret: str) -> list[str]:
    """The ways a key could leak: as text, hex (how pg_dump writes bytea),
    base64; and a long enough inner part to catch a truncated copy."""
    raw = secret.encode()
    return [
        secret,
        secret[4:-4],
        raw.hex(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
    ]


def assert_absent(secrets: list[str], text: str, where: str) -> None:
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, f"a provider key leaked into {where}"


class LogCapture:
    """Every log event, formatted, with its fields and any traceback."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __call__(self, event: dict) -> None:
        parts = [formatEvent(event) or ""]
        for key, value in event.items():
            if key in ("log_logger", "log_source", "log_observer"):
                continue
            parts.append(f"{key}={value!r}")
        failure = event.get("log_failure")
        if failure is not None:
            parts.append(failure.getTraceback())
        self.events.append(" ".join(parts))

    @property
    def text(self) -> str:
        return "\n".join(self.events)


@pytest.fixture
def logs():
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


def server_major(db_url: str) -> int:
    [(num,)] = admin_execute(db_url, "SHOW server_version_num")
    return int(num) // 10000


def find_pg_dump(major: int) -> str:
    """A pg_dump of the server's major version: the system's, or the one
    shipped with pgserver."""
    candidates = [shutil.which("pg_dump")]
    try:
        from pgserver._commands import POSTGRES_BIN_PATH

        candidates.append(str(POSTGRES_BIN_PATH / "pg_dump"))
    except ImportError:
        pass
    for path in filter(None, candidates):
        if not Path(path).exists():
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"(\d+)(?:\.\d+)?", out)
        if m and int(m.group(1)) == major:
            return path
    pytest.fail(f"no pg_dump of major version {major} (looked at {candidates})")


def pg_dump(db_url: str) -> str:
    tool = find_pg_dump(server_major(db_url))
    return subprocess.run(
        [tool, "--dbname", db_url, "--no-owner"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


async def admin(service, method: str, path: str, body=None) -> tuple[int, str]:
    resp = await treq.request(
        method,
        admin_url(service, path),
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "authorization": [f"Bearer {ADMIN_TOKEN}"],
            "content-type": ["application/json"],
        },
        persistent=False,
    )
    return resp.code, await resp.text()


@pytest_twisted.ensureDeferred
async def test_a_provider_key_never_leaks(db_url, tmp_path, logs):
    stored, refused, echoed, malformed = (
        canary("stored"),
        canary("refused"),
        canary("echoed"),
        canary("malformed"),
    )
    every = [stored, refused, echoed, malformed]
    fake = await FakeProviderServer.start()
    fake.resource.keys["openai"] |= {stored, echoed}
    k1, k2 = new_master_key(), new_master_key()
    service = await start_lectr(db_url, tmp_path, fake, ENCRYPTION_KEY=k1)
    bodies: list[str] = []
    try:
        c = service.components
        org, issued = await c.orgs.create_org("Acme")
        base = f"/admin/orgs/{org.id}/provider-keys"

        # stored: 201, the answer shows the last four characters only
        code, body = await admin(service, "POST", base, {"provider": "openai", "key": stored})
        assert code == 201, body
        bodies.append(body)
        key_id = json.loads(body)["id"]
        assert json.loads(body)["last4"] == stored[-4:]

        # refused by the provider: 422
        code, body = await admin(service, "POST", base, {"provider": "openai", "key": refused})
        assert code == 422, body
        bodies.append(body)

        # refused with a reason that repeats the key: 422, scrubbed
        fake.resource.next(
            Script(
                status=401,
                body=json.dumps({"error": {"message": f"Incorrect API key: {echoed}"}}).encode(),
            )
        )
        code, body = await admin(service, "POST", base, {"provider": "openai", "key": echoed})
        assert code == 422, body
        assert "Incorrect API key" in body
        bodies.append(body)

        # provider trouble: 502
        fake.resource.next(Script(status=503, body=b'{"error":{"message":"busy"}}'))
        code, body = await admin(service, "POST", base, {"provider": "openai", "key": echoed})
        assert code == 502, body
        bodies.append(body)

        # malformed: 400, the provider is not asked
        for bad in (f"{malformed} trailing", f"{malformed}\x00", f"\u00e9{malformed}"):
            code, body = await admin(service, "POST", base, {"provider": "openai", "key": bad})
            assert code == 400, body
            bodies.append(body)
        with pytest.raises(Exception) as e:
            check_key_format(f"{malformed}\n")
        assert malformed not in str(e.value)

        code, body = await admin(service, "GET", base)
        assert code == 200 and key_id in body
        bodies.append(body)

        # used by the proxy: the provider gets it, the client never sees it
        resp = await treq.post(
            proxy_url(service, "/v1/chat/completions"),
            data=b'{"model":"gpt-4o-mini","messages":[]}',
            headers={
                "authorization": [f"Bearer {issued.plaintext.reveal()}"],
                "content-type": ["application/json"],
            },
            persistent=False,
        )
        bodies.append(await resp.text())
        assert resp.code == 200
        bodies.append(repr(dict(resp.headers.getAllRawHeaders())))
        assert fake.resource.calls()[-1].header("authorization") == f"Bearer {stored}"
        assert repr(c.vault.provider_key(org.id, "openai")) == "<redacted>"
        await service.stopService()

        # rewrapped to a new master key
        service = await start_lectr(
            db_url, tmp_path, fake, ENCRYPTION_KEY=k1, ENCRYPTION_KEY_NEW=k2
        )
        await wait_for(lambda: service.components.vault._rewrapper.done, timeout=30)
        code, body = await admin(service, "GET", "/admin/vault/rotation")
        assert code == 200 and json.loads(body)["done"] is True, body
        bodies.append(body)
    finally:
        await service.stopService()
        await fake.stop()

    # positive controls: the capture works, the dump holds the row
    assert "provider key" in logs.text and key_id in logs.text
    dump = pg_dump(db_url)
    assert key_id in dump and "COPY public.provider_keys" in dump

    assert_absent(every, dump, "the pg_dump output")
    assert_absent(every, logs.text, "the logs")
    assert_absent(every, "\n".join(bodies), "an HTTP answer")
    for path in (tmp_path / "lectr-data").rglob("*"):
        if path.is_file():
            assert_absent(every, path.read_bytes().decode("latin-1"), str(path))
