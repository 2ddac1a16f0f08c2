"""Vault figures: the cost of decrypting one provider key, and the rate at
which a master-key rotation rewraps rows.

    LECTR_TEST_DATABASE_URL=postgresql://root@127.0.0.1:5432/test \\
        python bench/vault_bench.py [--rows 5000] [--batch 100 500]

1. ``Keyring.open`` (unwrap the DEK, decrypt the key: two AES-256-GCM
   decryptions) and ``VaultManager.provider_key`` (the proxy's call: cache
   lookup, decryption, ``Secret``), in µs per call, best of 5 timeit runs.
2. Rewrap: ``--rows`` rows sealed with one master key in a scratch database
   (a copy of the migrated template), then rewrapped to another by
   ``Rewrapper.run_once`` back to back (no pacing) for each ``--batch`` size;
   rows/s. In service the job is paced: ``rewrap_batch_size`` rows every
   ``rewrap_interval`` seconds (defaults 100 / 0.2 s, so at most 500 rows/s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import timeit
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg2
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from lectr.db.database import Database
from lectr.managers.vault import VaultManager
from lectr.providers import ProviderRegistry
from lectr.providers.catalogue.anthropic import Anthropic
from lectr.providers.catalogue.openai import OpenAI
from lectr.storage.provider_keys import ProviderKeyStore
from lectr.util.secret import Secret
from lectr.vault.crypto import Binding, Keyring
from lectr.vault.rotation import Rewrapper
from tests.support.pg import TestServer

KEY = "sk-proj-" + "x" * 156  # the length of a current OpenAI project key


def best_us(fn, number: int = 20_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def seed(url: str, kek: Secret[bytes], rows: int) -> None:
    """``rows`` provider keys over rows/4 orgs, sealed with ``kek``."""
    ring = Keyring(kek)
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        orgs = []
        for i in range(max(1, rows // 4)):
            cur.execute("INSERT INTO organizations (name) VALUES (%s) RETURNING id", (f"o{i}",))
            orgs.append(cur.fetchone()[0])
        values = []
        for i in range(rows):
            org = orgs[i % len(orgs)]
            rid = str(uuid.uuid4())
            s = ring.seal(Binding(org, "openai", rid), KEY.encode())
            values.append(
                (rid, org, "openai", "k", s.ciphertext, s.nonce, s.wrapped_dek, s.dek_nonce)
                + (s.kek_id, KEY[-4:])
            )
        cur.executemany(
            "INSERT INTO provider_keys (id, org_id, provider, name, ciphertext, nonce, "
            "wrapped_dek, dek_nonce, kek_id, last4) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            values,
        )
    conn.close()


def decrypt_figures() -> None:
    ring = Keyring(Secret(os.urandom(32)))
    b = Binding(str(uuid.uuid4()), "openai", str(uuid.uuid4()))
    sealed = ring.seal(b, KEY.encode())
    assert ring.open(b, sealed) == KEY.encode()
    print(
        f"Keyring.open (unwrap DEK + decrypt key):   {best_us(lambda: ring.open(b, sealed)):.1f} µs"
    )
    print(
        f"Keyring.seal (new DEK, encrypt, wrap):     {best_us(lambda: ring.seal(b, KEY.encode())):.1f} µs"
    )


async def main(reactor, rows: int, batches: list[int]) -> None:
    decrypt_figures()
    server = TestServer()
    old, new = Secret(os.urandom(32)), Secret(os.urandom(32))
    registry = ProviderRegistry([OpenAI(), Anthropic()])
    try:
        for batch in batches:
            name, url = server.create_database()
            try:
                started = time.perf_counter()
                seed(url, old, rows)
                print(f"seeded {rows} rows in {time.perf_counter() - started:.1f}s")
                db = Database(url, reactor=reactor, min_size=1, max_size=2)
                await db.start()
                store = ProviderKeyStore(db)
                if batch == batches[0]:
                    vault = VaultManager(
                        store, registry, kek=old, kek_new=None, http_request=None,
                        listener=None, reactor=reactor,
                    )  # fmt: skip
                    await vault.start()
                    org_id = next(iter(vault._cache))
                    assert vault.provider_key(org_id, "openai").reveal() == KEY
                    us = best_us(lambda v=vault, o=org_id: v.provider_key(o, "openai"))
                    print(f"VaultManager.provider_key (hot path):     {us:.1f} µs")
                    await vault.stop()
                rewrapper = Rewrapper(store, Keyring(old, new), reactor=reactor, batch_size=batch)
                started = time.perf_counter()
                total = 0
                while n := await rewrapper.run_once():
                    total += n
                elapsed = time.perf_counter() - started
                assert total == rows, (total, rows)
                print(
                    f"rewrap, batches of {batch}: {rows} rows in {elapsed:.2f}s = "
                    f"{rows / elapsed:.0f} rows/s (unpaced)"
                )
                await db.close()
            finally:
                server.drop_database(name)
    finally:
        server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 500])
    args = parser.parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, args.rows, args.batch)))
