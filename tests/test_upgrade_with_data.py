"""Upgrading a deployment that holds real data: a database filled the way an
older Lectr filled it (round 1 at revision 0001; key pools at 0005; the
partitioned, priced request log at 0008) is brought to head by Lectr's own
start-up, and everything the old data stands for still works through the
real ports: the old Lectr keys authenticate (or stay revoked), the org's old
provider key is the one the provider receives, disabled orgs and the model
policy still refuse, old members sign in with their roles, the admin API
lists the old requests and totals them exactly next to the new ones, a spill
journal the old node left is replayed, and a master-key rotation afterwards
rewraps the old provider keys. A last test runs the old nodes' own INSERT
against the new request log, as happens during a rolling upgrade.

The old data is written with SQL, as the old code wrote it, and the provider
keys are sealed here exactly as the old vault sealed them (the data key
wrapped with ``lectr/wrapped-dek/v1``, which bound no key options: commit
767ee1e, ``lectr/vault/crypto.py``), independently of the current crypto code,
so that a change of the stored format that leaves old rows behind fails here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg2
import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet import reactor
from twisted.internet.task import deferLater

from lectr.db import migrate
from tests.support.fake_provider import ANTHROPIC_KEY, OPENAI_KEY, FakeProviderServer
from tests.support.lectr_service import admin_url, proxy_url, start_lectr
from tests.support.oidc import LocalIssuer
from tests.support.process import new_master_key

pytestmark = pytest.mark.slow

ADMIN = {"authorization": ["Bearer test-admin-token-0123456789"]}
STRICT_OPENAI_KEY = "sk-test-strict-org-0123456789abcdefXYZW"
AZURE_KEY = "0123456789abcdef0123456789abcdef"
LOCAL_KEY = "sk-local-vllm-0123456789"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_HEADERS = {"anthropic-version": ["2023-06-01"]}
USAGE_SUMS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_creation_tokens",
)


# --- the old vault's format (commit 767ee1e), reproduced -----------------------------------------


def _old_ad(label: bytes, org_id: str, provider: str, record_id: str) -> bytes:
    out = b""
    for part in (label, org_id.encode(), provider.encode(), record_id.encode()):
        out += len(part).to_bytes(2, "big") + part
    return out


def old_seal(kek: bytes, org_id: str, provider: str, record_id: str, plaintext: str) -> dict:
    """The crypto columns of a provider_keys row as the vault of rounds 1 to
    0008 wrote them."""
    dek = AESGCM.generate_key(bit_length=256)
    nonce, dek_nonce = os.urandom(12), os.urandom(12)
    key_ad = _old_ad(b"lectr/provider-key/v1", org_id, provider, record_id)
    dek_ad = _old_ad(b"lectr/wrapped-dek/v1", org_id, provider, record_id)
    return {
        "ciphertext": AESGCM(dek).encrypt(nonce, plaintext.encode(), key_ad),
        "nonce": nonce,
        "wrapped_dek": AESGCM(kek).encrypt(dek_nonce, dek, dek_ad),
        "dek_nonce": dek_nonce,
        "kek_id": hmac.new(kek, b"lectr/kek-fingerprint/v1", hashlib.sha256).hexdigest()[:16],
    }


# --- the old data --------------------------------------------------------------------------------


@dataclass
class Old:
    """What was stored before the upgrade."""

    rev: str
    url: str
    kek_b64: str
    orgs: dict[str, str] = field(default_factory=dict)  # label -> org id
    keys: dict[str, str] = field(default_factory=dict)  # label -> Lectr key (plaintext)
    key_ids: dict[str, str] = field(default_factory=dict)  # label -> api_keys.id
    rows: list[dict] = field(default_factory=list)  # request_logs rows
    first_day: datetime | None = None
    end_day: datetime | None = None  # exclusive: every old row is before it


def _insert(cur, table: str, row: dict) -> None:
    cols = ", ".join(row)
    cur.execute(
        f"INSERT INTO {table} ({cols}) VALUES ({', '.join(['%s'] * len(row))})",
        list(row.values()),
    )


def _scalar(url: str, sql: str, args=None):
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchone()[0]
    finally:
        conn.close()


def _lectr_key() -> str:
    return "lc_" + str(uuid.uuid4())


def seed(url: str, rev: str, fake: FakeProviderServer) -> Old:
    """Fill a database at ``rev`` the way the Lectr of that revision did."""
    kek_b64 = new_master_key()
    kek = base64.b64decode(kek_b64)
    old = Old(rev, url, kek_b64)
    pools = rev >= "0005"  # provider keys carry weight, base_url, api_version
    priced = rev >= "0006"  # rows carry their cost; the flusher keeps the rollups
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            for label, name, enabled, age in (
                ("acme", "Acme", True, 90),
                ("dormant", "Dormant Ltd", False, 60),
                ("strict", "Strict Co", True, 30),
                # before 0004 names could repeat in another case: 0004 renames it
                ("twin", "ACME" if rev < "0004" else "Acme Twin", True, 10),
            ):
                cur.execute(
                    "INSERT INTO organizations (name, enabled, created_at, updated_at) "
                    "VALUES (%s, %s, now() - %s * interval '1 day', now() - %s * interval '1 day') "
                    "RETURNING id",
                    (name, enabled, age, age),
                )
                old.orgs[label] = cur.fetchone()[0]
            for label, org, revoked in (
                ("acme", "acme", False),
                ("acme_revoked", "acme", True),
                ("dormant", "dormant", False),
                ("strict", "strict", False),
                ("twin", "twin", False),
            ):
                plaintext = _lectr_key()
                cur.execute(
                    "INSERT INTO api_keys (org_id, name, key_hash, prefix, revoked_at) "
                    "VALUES (%s, %s, %s, %s, CASE WHEN %s THEN now() - interval '1 day' END) "
                    "RETURNING id",
                    (
                        old.orgs[org],
                        label,
                        hashlib.sha256(plaintext.encode("ascii")).hexdigest(),
                        plaintext[:11],
                        revoked,
                    ),
                )
                old.keys[label] = plaintext
                old.key_ids[label] = cur.fetchone()[0]
            provider_keys = [
                ("acme", "openai", OPENAI_KEY, {}),
                ("acme", "anthropic", ANTHROPIC_KEY, {}),
                ("dormant", "openai", OPENAI_KEY, {}),
                ("strict", "openai", STRICT_OPENAI_KEY, {}),
                ("strict", "anthropic", ANTHROPIC_KEY, {}),
                ("twin", "openai", OPENAI_KEY, {}),
            ]
            if pools:
                provider_keys.append(
                    (
                        "acme",
                        "azure",
                        AZURE_KEY,
                        {"base_url": fake.origin + "/azure", "api_version": "2024-10-21"},
                    )
                )
            if pools:
                # a custom provider a global admin added, and a route of acme's
                _insert(
                    cur,
                    "custom_providers",
                    {
                        "name": "local",
                        "display_name": "Local vLLM",
                        "dialect": "openai",
                        "base_url": fake.origin + "/local",
                        "auth": "bearer",
                    },
                )
                provider_keys.append(("acme", "local", LOCAL_KEY, {}))
                _insert(
                    cur,
                    "org_routes",
                    {
                        "org_id": old.orgs["acme"],
                        "name": "fast",
                        "targets": json.dumps(
                            [
                                {"provider": "local", "model": "llama-3", "weight": 1},
                                {"provider": "openai", "model": "gpt-4o-mini", "weight": 1},
                            ]
                        ),
                        "strategy": "fallback",
                        "retry_on": ["429", "5xx"],
                        "max_attempts": 2,
                    },
                )
            for org, provider, plaintext, options in provider_keys:
                record_id = str(uuid.uuid4())
                org_id = old.orgs[org]
                _insert(
                    cur,
                    "provider_keys",
                    {
                        "id": record_id,
                        "org_id": org_id,
                        "provider": provider,
                        "name": "main",
                        "last4": plaintext[-4:],
                        **old_seal(kek, org_id, provider, record_id, plaintext),
                        **options,
                    },
                )
            for org, provider, enabled, allowed, blocked in (
                ("acme", "openai", True, [], ["gpt-3.5*"]),
                ("strict", "openai", True, ["gpt-4o-mini"], []),
                ("strict", "anthropic", False, [], []),
            ):
                _insert(
                    cur,
                    "org_provider_settings",
                    {
                        "org_id": old.orgs[org],
                        "provider": provider,
                        "enabled": enabled,
                        "allowed_models": allowed,
                        "blocked_models": blocked,
                    },
                )
            # identities signed in through OIDC (Auth0) and their memberships
            for sub, is_admin, memberships in (
                ("auth0|alice", False, (("acme", "member"),)),
                ("auth0|carol", False, (("strict", "owner"), ("acme", "admin"))),
                ("auth0|root", True, ()),
            ):
                cur.execute(
                    "INSERT INTO user_identities (auth0_user_id, email, is_admin, last_seen_at) "
                    "VALUES (%s, %s, %s, now() - interval '3 days') RETURNING id",
                    (sub, sub.split("|")[1] + "@example.com", is_admin),
                )
                user_id = cur.fetchone()[0]
                for org, role in memberships:
                    _insert(
                        cur,
                        "org_members",
                        {"org_id": old.orgs[org], "user_id": user_id, "role": role},
                    )
            _seed_request_logs(cur, old, pools, priced)
    finally:
        conn.close()
    return old


def _seed_request_logs(cur, old: Old, pools: bool, priced: bool) -> None:
    """Requests of acme and strict over three past UTC days (two hours a
    day): every status the proxy logged, usage from the provider, estimated
    or unknown, rows of the revoked key and rows without a key or model."""
    rng = random.Random(f"upgrade-{old.rev}")
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    old.first_day, old.end_day = today - timedelta(days=4), today - timedelta(days=1)
    shapes = [  # provider, model, path, status, usage source, error type
        ("openai", "gpt-4o-mini", "/v1/chat/completions", 200, "provider", None),
        ("openai", "gpt-4o", "/v1/chat/completions", 200, "provider", None),
        ("openai", "gpt-4o-mini", "/v1/chat/completions", 499, "estimated", "client_disconnect"),
        ("openai", "gpt-4o-mini", "/v1/chat/completions", 429, "none", "upstream_status"),
        ("openai", None, "/v1/models", 200, "none", None),
        ("anthropic", "claude-3-5-haiku-latest", "/v1/messages", 200, "provider", None),
        ("anthropic", "claude-3-5-haiku-latest", "/v1/messages", 502, "none", "upstream_connect"),
    ]
    for day in range(4, 1, -1):
        for hour in (3, 17):
            at = (
                old.end_day
                - timedelta(days=day - 1)
                + timedelta(hours=hour, minutes=rng.randrange(60))
            )
            for org, key_labels in (
                ("acme", ("acme", "acme_revoked", None)),
                ("strict", ("strict",)),
            ):
                for provider, model, path, status, source, error in shapes:
                    metered = source != "none"
                    prompt = rng.randrange(1, 5000) if metered else None
                    completion = rng.randrange(0, 800) if metered else None
                    cached = rng.choice([0, 0, rng.randrange(1, 1024)]) if metered else None
                    label = rng.choice(key_labels)
                    row = {
                        "request_id": str(uuid.uuid4()),
                        "created_at": at + timedelta(seconds=rng.randrange(3000)),
                        "org_id": old.orgs[org],
                        "key_id": old.key_ids[label] if label else None,
                        "provider": provider,
                        "model": model,
                        "method": "GET" if model is None else "POST",
                        "path": path,
                        "status": status,
                        "latency_ms": round(rng.uniform(20, 4000), 3),
                        "ttfb_ms": round(rng.uniform(5, 500), 3) if status < 400 else None,
                        "streamed": rng.random() < 0.5,
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion if metered else None,
                        "cached_tokens": cached,
                        "cache_creation_tokens": rng.randrange(0, 300)
                        if metered and provider == "anthropic"
                        else None,
                        "usage_source": source,
                        "error_type": error,
                    }
                    if pools:
                        row["attempts"] = 1 if status != 502 else 2
                    if priced:
                        # the gpt-4o rows priced, the rest not (a model without a price);
                        # (the old recorder also stored the price basis: left out here,
                        # nothing below reads it)
                        row["cost_usd"] = (
                            Decimal(rng.randrange(1, 10**6)) / 10**6
                            if metered and model == "gpt-4o"
                            else None
                        )
                    _insert(cur, "request_logs", row)
                    old.rows.append(row)
    if priced:
        # what the usage flusher added to the rollups with each batch (0006-0008)
        cur.execute(
            "INSERT INTO usage_hourly (org_id, hour, provider, model, key_id, requests, "
            " errors, unmetered, estimated, unpriced, cache_hits, prompt_tokens, "
            " completion_tokens, total_tokens, cached_tokens, cache_creation_tokens, cost_usd) "
            "SELECT org_id, date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', "
            " provider, coalesce(model, ''), "
            " coalesce(key_id, '00000000-0000-0000-0000-000000000000'::uuid), count(*), "
            " count(*) FILTER (WHERE status >= 400), "
            " count(*) FILTER (WHERE usage_source = 'none'), "
            " count(*) FILTER (WHERE usage_source = 'estimated'), "
            " count(*) FILTER (WHERE usage_source <> 'none' AND cost_usd IS NULL), "
            " count(*) FILTER (WHERE cached_tokens > 0), coalesce(sum(prompt_tokens), 0), "
            " coalesce(sum(completion_tokens), 0), coalesce(sum(total_tokens), 0), "
            " coalesce(sum(cached_tokens), 0), coalesce(sum(cache_creation_tokens), 0), "
            " coalesce(sum(cost_usd), 0) FROM request_logs GROUP BY 1, 2, 3, 4, 5"
        )


def expected_totals(rows: list[dict], key) -> dict:
    """The usage API's items, computed from the old rows themselves."""
    out: dict = {}
    for r in rows:
        t = out.setdefault(
            key(r),
            {
                "requests": 0,
                "errors": 0,
                "unmetered": 0,
                "estimated": 0,
                "unpriced": 0,
                "cache_hits": 0,
                **dict.fromkeys(USAGE_SUMS, 0),
                "cost_usd": Decimal(0),
            },
        )
        t["requests"] += 1
        t["errors"] += r["status"] >= 400
        t["unmetered"] += r["usage_source"] == "none"
        t["estimated"] += r["usage_source"] == "estimated"
        t["unpriced"] += r["usage_source"] != "none" and r.get("cost_usd") is None
        t["cache_hits"] += (r["cached_tokens"] or 0) > 0
        for name in USAGE_SUMS:
            t[name] += r[name] or 0
        t["cost_usd"] += r.get("cost_usd") or 0
    return out


def write_old_journal(data_dir, old: Old) -> None:
    """A spill segment left by the old node (PostgreSQL was unreachable, or
    0008 refused its inserts during the rolling upgrade), in the journal's
    first format (commit c6938c0: a header line, then one 19-item JSON array
    per row). The new node replays it: the rows join the old ones."""
    spill = data_dir / "usage-spill"
    spill.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"lectr_usage_spill": 1}) + "\n"]
    at = old.end_day - timedelta(hours=5)
    for i, (org, label, status, source) in enumerate(
        (
            ("acme", "acme", 200, "provider"),
            ("acme", "acme_revoked", 200, "estimated"),
            ("acme", "acme", 500, "none"),
            ("strict", "strict", 200, "provider"),
        )
    ):
        metered = source != "none"
        row = {
            "request_id": str(uuid.uuid4()),
            "created_at": at + timedelta(minutes=7 * i),
            "org_id": old.orgs[org],
            "key_id": old.key_ids[label],
            "provider": "openai",
            "model": "mystery-model-7",  # unpriced, so the totals are exact
            "method": "POST",
            "path": "/v1/chat/completions",
            "status": status,
            "latency_ms": 120.5 + i,
            "ttfb_ms": 30.25 if status < 400 else None,
            "streamed": i % 2 == 0,
            "prompt_tokens": 100 + i if metered else None,
            "completion_tokens": 7 * i if metered else None,
            "total_tokens": 100 + 8 * i if metered else None,
            "cached_tokens": 64 if i == 0 else (0 if metered else None),
            "cache_creation_tokens": None,
            "usage_source": source,
            "error_type": None if status < 400 else "upstream_status",
        }
        encoded = [v.isoformat() if isinstance(v, datetime) else v for v in row.values()]
        lines.append(json.dumps(encoded, separators=(",", ":")) + "\n")
        old.rows.append(row)
    name = f"spill-{time.time_ns():020d}-999999-{os.urandom(4).hex()}.jsonl"
    (spill / name).write_text("".join(lines))


async def replayed(service) -> None:
    recorder = service.components.recorder
    deadline = time.monotonic() + 30
    while recorder.journal.has_segments():
        assert time.monotonic() < deadline, "the old spill journal was not replayed"
        await recorder.flush_now()
        await deferLater(reactor, 0.05)


# --- the running Lectr ---------------------------------------------------------------------------


class Client:
    def __init__(self, service, issuer: LocalIssuer | None = None) -> None:
        self.service = service
        self.issuer = issuer

    async def proxy(self, key: str, path: str, body: dict, headers=None):
        resp = await treq.post(
            proxy_url(self.service, path),
            data=json.dumps(body).encode(),
            headers={
                "content-type": ["application/json"],
                "authorization": [f"Bearer {key}"],
                **(headers or {}),
            },
            persistent=False,
        )
        content = await resp.content()
        rid = resp.headers.getRawHeaders(b"x-lectr-request-id", [b""])[0].decode()
        return resp.code, content, rid

    async def admin(self, path: str, _token: str | None = None, _status: int = 200, **params):
        headers = {"authorization": [f"Bearer {_token}"]} if _token else ADMIN
        resp = await treq.get(
            admin_url(self.service, path), params=params, headers=headers, persistent=False
        )
        text = await resp.text()
        assert resp.code == _status, (path, resp.code, text)
        return json.loads(text)

    async def all_requests(self, org_id: str) -> dict[str, dict]:
        out: dict[str, dict] = {}
        params: dict = {"limit": "200"}
        while True:
            page = await self.admin(f"/admin/orgs/{org_id}/requests", **params)
            for item in page["items"]:
                assert item["request_id"] not in out
                out[item["request_id"]] = item
            if page["next_cursor"] is None:
                return out
            params = {"limit": "200", "cursor": page["next_cursor"]}

    async def usage(self, org_id: str, since: datetime, until: datetime, group_by: str) -> dict:
        doc = await self.admin(
            f"/admin/orgs/{org_id}/usage",
            since=since.isoformat(),
            until=until.isoformat(),
            group_by=group_by,
        )
        return {item.pop("key"): item for item in doc["items"]}


def _compare(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(got, key=str), sorted(want, key=str))
    for group, w in want.items():
        g = got[group]
        for name, value in w.items():
            if name == "cost_usd":
                assert Decimal(g[name]) == value, (group, name)
            else:
                assert g[name] == value, (group, name, g[name], value)


@pytest_twisted.async_yield_fixture
async def fake():
    server = await FakeProviderServer.start()
    server.resource.keys["openai"].add(STRICT_OPENAI_KEY)
    server.resource.keys["azure"] = {AZURE_KEY}
    server.resource.keys["local"] = {LOCAL_KEY}
    yield server
    await server.stop()


@pytest.mark.parametrize("rev", ["0001", "0005", "0008"])
@pytest_twisted.ensureDeferred
async def test_an_old_deployment_works_after_the_upgrade(rev, empty_db_url, tmp_path, fake):
    url = empty_db_url
    migrate.upgrade_sync(url, rev)
    old = seed(url, rev, fake)
    write_old_journal(tmp_path / "lectr-data", old)

    # Lectr's own start-up migrates to head, with the master key of old
    issuer = await LocalIssuer.start()
    try:
        service = await start_lectr(
            url,
            tmp_path,
            fake,
            ENCRYPTION_KEY=old.kek_b64,
            LECTR_KEY_BASE_URL_HOSTS="127.0.0.1",
            **issuer.env(),
        )
        try:
            assert migrate.current_revision_sync(url) == migrate.head_revision()
            await replayed(service)
            await _check(Client(service, issuer), service, old, fake)
        finally:
            await service.stopService()
    finally:
        await issuer.stop()

    # a master-key rotation after the upgrade rewraps the old rows (their
    # data keys wrapped the old way) and they open under the new key alone
    new_kek = new_master_key()
    env = {"LECTR_KEY_BASE_URL_HOSTS": "127.0.0.1"}
    service = await start_lectr(
        url, tmp_path, fake, ENCRYPTION_KEY=old.kek_b64, ENCRYPTION_KEY_NEW=new_kek, **env
    )
    try:
        vault = service.components.vault
        while not (await vault.rotation_status()).done:
            await deferLater(reactor, 0.05)
    finally:
        await service.stopService()
    service = await start_lectr(url, tmp_path, fake, ENCRYPTION_KEY=new_kek, **env)
    try:
        client = Client(service)
        fake.resource.reset()
        calls = [("/v1/chat/completions", "gpt-4o-mini", None, "openai")]
        if rev >= "0005":
            calls.append(("/azure/v1/chat/completions", "my-deployment", None, "azure"))
            calls.append(("/v1/chat/completions", "fast", None, "local"))
        calls.append(("/v1/messages", "claude-3-5-haiku-latest", ANTHROPIC_HEADERS, "anthropic"))
        for path, model, headers, name in calls:
            body = MESSAGE if name == "anthropic" else CHAT
            code, content, _ = await client.proxy(
                old.keys["acme"], path, {**body, "model": model}, headers
            )
            assert code == 200, (name, content)
        assert [c.provider for c in fake.resource.calls()] == [c[3] for c in calls]
    finally:
        await service.stopService()


async def _check(client: Client, service, old: Old, fake) -> None:
    acme, strict = old.orgs["acme"], old.orgs["strict"]
    provider = fake.resource

    # totals over the old days: the sums of the old rows, whatever the grouping
    for group_by, key in (
        ("day", lambda r: r["created_at"].astimezone(UTC).date().isoformat()),
        ("model", lambda r: r["model"]),
        ("provider", lambda r: r["provider"]),
        ("key", lambda r: r["key_id"]),
    ):
        for org_id in (acme, strict):
            rows = [r for r in old.rows if r["org_id"] == org_id]
            got = await client.usage(org_id, old.first_day, old.end_day, group_by)
            _compare(got, expected_totals(rows, key))
    total = await client.admin(
        "/admin/usage", since=old.first_day.isoformat(), until=old.end_day.isoformat()
    )
    by_org = {item["key"]: item["requests"] for item in total["items"]}
    assert by_org == {
        acme: sum(r["org_id"] == acme for r in old.rows),
        strict: sum(r["org_id"] == strict for r in old.rows),
    }

    # the old rows are listed as they were stored
    listed = await client.all_requests(acme)
    old_acme = {r["request_id"]: r for r in old.rows if r["org_id"] == acme}
    assert set(listed) == set(old_acme)
    for rid, row in old_acme.items():
        item = listed[rid]
        for name in (
            "key_id",
            "provider",
            "model",
            "method",
            "path",
            "status",
            "streamed",
            "usage_source",
            "error_type",
            *USAGE_SUMS,
        ):
            assert item[name] == row[name], (name, item[name], row[name])
        assert datetime.fromisoformat(item["created_at"]) == row["created_at"]
        assert item["attempts"] == row.get("attempts", 1)
        assert item["route"] is None and item["fallbacks"] is None
        cost = row.get("cost_usd")
        assert (Decimal(item["cost_usd"]) if item["cost_usd"] is not None else None) == cost

    # the old identities sign in (OIDC) with their old roles and admin flag
    issuer = client.issuer
    alice, carol, root = (issuer.token(f"auth0|{n}") for n in ("alice", "carol", "root"))
    page = await client.admin(f"/admin/orgs/{acme}/requests", _token=alice, limit="5")
    assert len(page["items"]) == 5
    await client.admin(f"/admin/orgs/{strict}/requests", _token=alice, _status=404)
    mine = await client.admin("/admin/orgs", _token=carol)
    assert {o["id"] for o in mine["items"]} == {acme, strict}
    everyone = await client.admin("/admin/orgs", _token=root)
    assert set(old.orgs.values()) <= {o["id"] for o in everyone["items"]}

    # one old request, alone and with its cost explained (stored unpriced)
    rid, row = next((k, r) for k, r in old_acme.items() if r.get("cost_usd") is None)
    one = await client.admin(f"/admin/orgs/{acme}/requests/{rid}")
    assert (one["status"], one["total_tokens"]) == (row["status"], row["total_tokens"])
    explained = await client.admin(f"/admin/requests/{rid}")
    assert explained["request"]["request_id"] == rid and explained["pricing"] is None

    # a live view started now; and one a dashboard kept open across the
    # upgrade (before 0009 a live cursor was the id of the newest row seen)
    live = (await client.admin(f"/admin/orgs/{acme}/requests", limit="1"))["live_cursor"]
    newest_old_id = _scalar(old.url, "SELECT max(id) FROM request_logs")
    id_cursor = base64.urlsafe_b64encode(f"live:{newest_old_id}".encode()).decode().rstrip("=")

    # the old keys, through the proxy, with the orgs' old provider keys injected
    provider.reset()
    new_ids: set[str] = set()
    route_rid = None
    code, body, rid = await client.proxy(
        old.keys["acme"], "/v1/chat/completions", {**CHAT, "model": "gpt-4o-mini"}
    )
    assert code == 200, body
    new_ids.add(rid)
    [call] = provider.calls("openai")
    assert call.header("authorization") == f"Bearer {OPENAI_KEY}"
    code, body, rid = await client.proxy(
        old.keys["acme"],
        "/v1/messages",
        {**MESSAGE, "model": "claude-3-5-haiku-latest"},
        ANTHROPIC_HEADERS,
    )
    assert code == 200, body
    new_ids.add(rid)
    [call] = provider.calls("anthropic")
    assert call.header("x-api-key") == ANTHROPIC_KEY
    if old.rev >= "0005":
        code, body, rid = await client.proxy(
            old.keys["acme"], "/azure/v1/chat/completions", {**CHAT, "model": "my-deployment"}
        )
        assert code == 200, body
        new_ids.add(rid)
        [call] = provider.calls("azure")
        assert call.header("api-key") == AZURE_KEY
        assert call.query == "api-version=2024-10-21"
        # the old route, to the old custom provider with its old key
        code, body, rid = await client.proxy(
            old.keys["acme"], "/v1/chat/completions", {**CHAT, "model": "fast"}
        )
        assert code == 200, body
        new_ids.add(rid)
        route_rid = rid
        [call] = provider.calls("local")
        assert call.header("authorization") == f"Bearer {LOCAL_KEY}"
        assert call.json()["model"] == "llama-3"
    # the old blocked model
    code, body, _ = await client.proxy(
        old.keys["acme"], "/v1/chat/completions", {**CHAT, "model": "gpt-3.5-turbo"}
    )
    assert code == 403, body

    provider.reset()
    code, body, _ = await client.proxy(
        old.keys["strict"], "/v1/chat/completions", {**CHAT, "model": "gpt-4o-mini"}
    )
    assert code == 200, body
    [call] = provider.calls("openai")
    assert call.header("authorization") == f"Bearer {STRICT_OPENAI_KEY}"
    # outside the old allow list; a provider the org disabled
    code, body, _ = await client.proxy(
        old.keys["strict"], "/v1/chat/completions", {**CHAT, "model": "gpt-4o"}
    )
    assert code == 403, body
    code, body, _ = await client.proxy(
        old.keys["strict"],
        "/v1/messages",
        {**MESSAGE, "model": "claude-3-5-haiku-latest"},
        ANTHROPIC_HEADERS,
    )
    assert code == 403, body

    # the org renamed by 0004 (round 1 allowed a name taken in another case)
    twin = await client.admin(f"/admin/orgs/{old.orgs['twin']}")
    assert twin["name"] == ("ACME (2)" if old.rev < "0004" else "Acme Twin")
    code, body, _ = await client.proxy(
        old.keys["twin"], "/v1/chat/completions", {**CHAT, "model": "gpt-4o-mini"}
    )
    assert code == 200, body

    # a revoked key, an unknown key, a disabled org
    for key, status in (
        (old.keys["acme_revoked"], 401),
        (_lectr_key(), 401),
        (old.keys["dormant"], 403),
    ):
        code, body, _ = await client.proxy(
            key, "/v1/chat/completions", {**CHAT, "model": "gpt-4o-mini"}
        )
        assert code == status, (status, body)
    # only the strict and twin orgs' allowed requests went upstream
    assert len(provider.calls()) == 2

    # the new requests are logged alongside the old ones, and the live view sees them
    await service.components.recorder.flush_now()
    listed = await client.all_requests(acme)
    assert set(old_acme) < set(listed)
    added = set(listed) - set(old_acme)
    assert new_ids <= added
    if route_rid is not None:
        assert (listed[route_rid]["route"], listed[route_rid]["provider"]) == ("fast", "local")
    live_rows = await client.admin(f"/admin/orgs/{acme}/requests", after=live, limit="200")
    assert {item["request_id"] for item in live_rows["items"]} == added
    live_rows = await client.admin(f"/admin/orgs/{acme}/requests", after=id_cursor, limit="200")
    assert {item["request_id"] for item in live_rows["items"]} == added
    # and the totals count old and new
    now = datetime.now(UTC)
    got = await client.usage(acme, old.first_day, now + timedelta(hours=1), "provider")
    assert sum(t["requests"] for t in got.values()) == len(old_acme) + len(added)


# --- old nodes during a rolling upgrade ----------------------------------------------------------

_R1_COLUMNS = (
    "request_id, created_at, org_id, key_id, provider, model, method, path, status, "
    "latency_ms, ttfb_ms, streamed, prompt_tokens, completion_tokens, total_tokens, "
    "cached_tokens, cache_creation_tokens, usage_source, error_type"
)
_R1_TYPES = (
    "uuid timestamptz uuid uuid text text text text smallint float8 float8 bool "
    "int int int int int text text"
).split()
# the usage recorder's statements of earlier versions, as they were
OLD_INSERTS = {
    # round 1 (commit c6938c0, lectr/storage/request_logs.py)
    "round-1": (
        f"INSERT INTO request_logs ({_R1_COLUMNS}) SELECT * FROM unnest("
        + ", ".join(f"%s::{t}[]" for t in _R1_TYPES)
        + ") ON CONFLICT (request_id) DO NOTHING",
        _R1_TYPES,
    ),
    # key pools and routes (commit d454b6e)
    "0005": (
        f"INSERT INTO request_logs ({_R1_COLUMNS}, route, provider_key_id, attempts, fallbacks) "
        "SELECT * FROM unnest("
        + ", ".join(f"%s::{t}[]" for t in [*_R1_TYPES, "text", "uuid", "smallint", "jsonb"])
        + ") ON CONFLICT (request_id) DO NOTHING",
        [*_R1_TYPES, "text", "uuid", "smallint", "jsonb"],
    ),
}


def _old_row_arrays(types: list[str], org_id: str) -> list[list]:
    values = {
        "uuid": None,
        "timestamptz": datetime.now(UTC),
        "text": None,
        "smallint": 200,
        "float8": 12.5,
        "bool": False,
        "int": 10,
        "jsonb": None,
    }
    row = [values[t] for t in types]
    row[0], row[2] = str(uuid.uuid4()), org_id
    row[4], row[6], row[7], row[17] = "openai", "POST", "/v1/chat/completions", "provider"
    if len(types) > 19:
        row[21] = 1
    return [[v] for v in row]


@pytest.mark.parametrize("era", sorted(OLD_INSERTS))
def test_an_old_nodes_usage_rows_are_spilled_not_dropped(era, empty_db_url):
    """During a rolling upgrade to head, a node of round 1 (or of 0005) still
    runs its own INSERT against the partitioned request log. It must fail as
    the database failing (the old recorder then spills the rows to its
    journal and replays them once upgraded), never as a data error: the old
    recorder drops a row PostgreSQL refuses as data (its ``_DATA_ERRORS``:
    DataError, IntegrityError)."""
    sql, types = OLD_INSERTS[era]
    migrate.upgrade_sync(empty_db_url, "0007")
    conn = psycopg2.connect(empty_db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO organizations (name) VALUES ('Acme') RETURNING id")
            org_id = cur.fetchone()[0]
            cur.execute(sql, _old_row_arrays(types, org_id))  # before 0008: stored
            assert cur.rowcount == 1
            migrate.upgrade_sync(empty_db_url)
            with pytest.raises(psycopg2.Error) as raised:
                cur.execute(sql, _old_row_arrays(types, org_id))
    finally:
        conn.close()
    # "no unique or exclusion constraint matching the ON CONFLICT specification"
    assert raised.value.pgcode == "42P10"
    assert not isinstance(raised.value, psycopg2.DataError | psycopg2.IntegrityError)
