"""What the limits step costs the proxy: microseconds per ``admit()`` +
``settle()`` on the reactor thread.

    .venv/bin/python bench/limits_bench.py [--database-url URL] [--calls 200000]

Creates a scratch database (the role needs CREATEDB), runs the migrations,
starts a real LimitsManager on the real reactor, and measures, for calls in
slices of 1,000 (yielding to the reactor between slices, so that the lease
rounds with PostgreSQL run in the background as they would between
requests):

- an org without limits (the shared no-op admission: one dict lookup);
- an org and its key both with every limit set (rpm, tpm, max_concurrent,
  usd_per_day, usd_per_month; caps high enough never to refuse), priced
  requests (a reservation and a cost);
- the same with the requests refused (a cap of 1 already used);
- the policy step as the proxy runs it (``lectr.policy.limits.Limits``):
  the same org and key, a bench-like request on a two-target route, its
  reservation priced from the shipped catalogue, settled with a cost in
  whole micro-dollars as the proxy settles it.

Only the synchronous calls are timed, not the rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import timeit
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, task

from lectr.db.database import Database
from lectr.db.migrate import upgrade_sync
from lectr.limits import Admission, LimitsManager
from lectr.managers.orgs import OrgManager
from lectr.managers.routes import Target
from lectr.metrics import Registry
from lectr.policy.limits import Limits
from lectr.pricing.manager import PricingManager
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.limits import LimitStore
from lectr.storage.orgs import OrgStore
from tests.support.pg import admin_execute, with_database

EVERY_LIMIT = {
    "rpm": 1_000_000_000,
    "tpm": 1_000_000_000_000,
    "max_concurrent": 1_000_000,
    "usd_per_day": "1000000000",
    "usd_per_month": "1000000000",
}


async def measure(reactor, m: LimitsManager, org: str, key: str, calls: int, priced: bool):
    """(wall-clock µs, CPU µs) per call, and how many were admitted."""
    reserve = Decimal("0.0123") if priced else None
    cost = Decimal("0.0042") if priced else None
    wall = cpu = 0.0
    admitted = 0
    admit = m.admit
    for _ in range(0, calls, 1000):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(1000):
            a = admit(org, key, reserve_usd=reserve)
            if isinstance(a, Admission):
                a.settle(tokens=350, cost_usd=cost)
                admitted += 1
        wall += time.perf_counter() - t
        cpu += time.process_time() - c
        await task.deferLater(reactor, 0)  # the lease rounds run here
    return wall / calls * 1e6, cpu / calls * 1e6, admitted


async def measure_step(reactor, m: LimitsManager, org: str, key: str, calls: int):
    """The same for the policy step and the settlement of a proxied request."""
    step = Limits(m, dearest=PricingManager(reactor=reactor, metrics=Registry()).dearest_micro)
    body = b'{"model":"bench","messages":[{"role":"user","content":"Say hello"}]}'
    call = SimpleNamespace(
        ident=SimpleNamespace(org_id=org, key_id=key),
        read=SimpleNamespace(body=body, doc={"model": "bench", "messages": []}),
        plan=SimpleNamespace(targets=[Target("openai", "gpt-4o-mini"), Target("openai", "gpt-4o")]),
        admission=None,
        dry_run=False,
    )
    wall = cpu = 0.0
    admitted = 0
    for _ in range(0, calls, 1000):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(1000):
            call.admission = None
            if step(call) is None:
                call.admission.settle(tokens=350, cost_usd=4200)
                admitted += 1
        wall += time.perf_counter() - t
        cpu += time.process_time() - c
        await task.deferLater(reactor, 0)
    return wall / calls * 1e6, cpu / calls * 1e6, admitted


async def run(reactor, url: str, calls: int) -> None:
    db = Database(url, reactor=reactor, min_size=2, max_size=4)
    await db.start()
    orgs = OrgManager(OrgStore(db), ApiKeyStore(db))
    m = LimitsManager(LimitStore(db), reactor=reactor, metrics=Registry())
    await m.start()
    plain, plain_key = await orgs.create_org("no limits")
    limited, limited_key = await orgs.create_org("every limit")
    await m.update(limited.id, None, EVERY_LIMIT)
    await m.update(limited.id, limited_key.key.id, EVERY_LIMIT)
    full, full_key = await orgs.create_org("refused")
    await m.update(full.id, None, {"rpm": 1})
    m.admit(full.id, full_key.key.id, reserve_usd=None)
    await m.sync()

    rows = [
        ("no limits", plain.id, plain_key.key.id, False),
        ("org + key, every limit, unpriced", limited.id, limited_key.key.id, False),
        ("org + key, every limit, priced", limited.id, limited_key.key.id, True),
        ("refused (rpm reached)", full.id, full_key.key.id, False),
    ]
    await measure(reactor, m, limited.id, limited_key.key.id, 20_000, True)  # warm-up
    rounds = m._m_rounds
    before = rounds.value("ok")
    reference = min(timeit.repeat("sum(range(100))", number=20_000, repeat=7)) / 20_000 * 1e6
    print(f"(this machine: sum(range(100)) takes {reference:.2f} us)")
    for label, org, key, priced in rows:
        wall, cpu, admitted = await measure(reactor, m, org, key, calls, priced)
        print(
            f"{label:36s} {wall:6.2f} us per admit()+settle() (CPU {cpu:.2f} us; "
            f"{admitted} admitted)"
        )
    wall, cpu, admitted = await measure_step(reactor, m, limited.id, limited_key.key.id, calls)
    print(
        f"{'policy step, every limit, catalogue':36s} {wall:6.2f} us per step+settle() "
        f"(CPU {cpu:.2f} us; {admitted} admitted)"
    )
    print(f"lease rounds meanwhile: {rounds.value('ok') - before:.0f} ok")
    await m.stop()
    await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LECTR_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test"),
        help="a PostgreSQL server URL whose role may CREATE DATABASE",
    )
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    name = f"lectr_bench_{os.getpid()}"
    admin_execute(args.database_url, f'CREATE DATABASE "{name}"')
    url = with_database(args.database_url, name)
    try:
        upgrade_sync(url)
        task.react(lambda reactor: defer.ensureDeferred(run(reactor, url, args.calls)))
    finally:
        admin_execute(args.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
