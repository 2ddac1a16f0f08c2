"""``twistd lectr`` with a master key that does not fit the stored provider
keys: one clear line on stderr, a non-zero exit, no key material anywhere."""

from __future__ import annotations

import base64
import uuid

import psycopg2
import pytest

from lectr.config import parse_master_key
from lectr.vault.crypto import Binding, Keyring, kek_fingerprint
from tests.support.process import LectrProcess, base_env, new_master_key
from tests.test_startup import assert_one_clear_line, run_failing

pytestmark = pytest.mark.slow

PROVIDER_KEY = "sk-test-startup-canary-6f1d2c3b4a59"


def store_one_key(db_url: str, kek_b64: str) -> None:
    """An org with one OpenAI key sealed by ``kek_b64``, written directly."""
    ring = Keyring(parse_master_key(kek_b64))
    conn = psycopg2.connect(db_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO organizations (name) VALUES ('Acme') RETURNING id")
            (org_id,) = cur.fetchone()
            record_id = str(uuid.uuid4())
            s = ring.seal(Binding(org_id, "openai", record_id), PROVIDER_KEY.encode())
            cur.execute(
                "INSERT INTO provider_keys (id, org_id, provider, name, ciphertext, nonce, "
                "wrapped_dek, dek_nonce, kek_id, last4) "
                "VALUES (%s, %s, 'openai', 'k', %s, %s, %s, %s, %s, %s)",
                (
                    record_id,
                    org_id,
                    s.ciphertext,
                    s.nonce,
                    s.wrapped_dek,
                    s.dek_nonce,
                    s.kek_id,
                    "2c3b",
                ),
            )
    finally:
        conn.close()


def test_wrong_encryption_key_is_one_clear_line(tmp_path, db_url):
    right, wrong = new_master_key(), new_master_key()
    store_one_key(db_url, right)
    proc = run_failing(tmp_path, DATABASE_URL=db_url, ENCRYPTION_KEY=wrong)
    line = assert_one_clear_line(proc, "lectr: start-up failed", "ENCRYPTION_KEY does not match")
    right_fp = kek_fingerprint(parse_master_key(right).reveal())
    wrong_fp = kek_fingerprint(parse_master_key(wrong).reveal())
    assert right_fp in line and wrong_fp in line
    for secret in (right, wrong, PROVIDER_KEY):
        assert secret not in proc.output
    for key in (right, wrong):
        raw = base64.b64decode(key)
        assert raw.hex() not in proc.output


def test_right_key_as_the_new_key_starts(tmp_path, db_url):
    """ENCRYPTION_KEY_NEW can open the rows too: the rotation's first restart
    may name the keys either way round."""
    right, other = new_master_key(), new_master_key()
    store_one_key(db_url, right)
    proc = LectrProcess(
        base_env(DATABASE_URL=db_url, ENCRYPTION_KEY=other, ENCRYPTION_KEY_NEW=right),
        cwd=tmp_path,
    )
    try:
        proc.wait_ready()
        assert "vault: 1 provider keys loaded" in proc.output
    finally:
        proc.stop_cleanly()
    for secret in (right, other, PROVIDER_KEY):
        assert secret not in proc.output
