"""One node of the cluster test: its own reactor, PostgreSQL pool and
LimitsManager, and ``--clients`` concurrent clients that hammer one key
from ``--start-at`` for ``--seconds``. Prints one JSON line: the requests
admitted per UTC minute (by admission time), and the refusals.

    python -m tests.support.limits_driver --dsn URL --org ID --key ID \\
        --clients 2 --start-at EPOCH --seconds 60

Each admitted request is held for ``--hold-ms`` (a pretend upstream call),
then settled with ``--tokens``; a refused client yields to the reactor and
tries again at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater

from lectr.db.database import Database
from lectr.limits import Admission, LimitsManager
from lectr.storage.limits import LimitStore


async def client(m: LimitsManager, args, stop_at: float, admitted: Counter, refused: Counter):
    while reactor.seconds() < stop_at:
        result = m.admit(args.org, args.key, reserve_usd=None)
        now = reactor.seconds()
        if isinstance(result, Admission):
            admitted[int(math.floor(now / 60) * 60)] += 1
            await deferLater(reactor, args.hold_ms / 1000)
            result.settle(tokens=args.tokens, cost_usd=None)
        else:
            refused[result.limit] += 1
            await deferLater(reactor, 0)


async def main(args) -> dict:
    db = Database(args.dsn, reactor=reactor, min_size=1, max_size=4)
    await db.start()
    m = LimitsManager(LimitStore(db), reactor=reactor, lease_fraction=args.lease_fraction)
    await m.start()
    admitted: Counter = Counter()
    refused: Counter = Counter()
    try:
        await deferLater(reactor, max(0.0, args.start_at - reactor.seconds()))
        stop_at = args.start_at + args.seconds
        await DeferredList(
            [
                ensureDeferred(client(m, args, stop_at, admitted, refused))
                for _ in range(args.clients)
            ],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
    finally:
        await m.stop()
        await db.close()
    return {
        "node": m.node_id,
        "admitted_by_minute": {str(k): v for k, v in sorted(admitted.items())},
        "refused": dict(refused),
        "lease_rounds": m._m_rounds.value("ok"),
    }


def run() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    p.add_argument("--org", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--start-at", type=float, required=True)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--hold-ms", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=10)
    p.add_argument("--lease-fraction", type=float, default=0.05)
    args = p.parse_args()
    outcome: dict = {}

    def done(result):
        outcome["result"] = result
        reactor.stop()

    def failed(failure):
        outcome["error"] = failure.getTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(main(args)).addCallbacks(done, failed))
    reactor.run()
    if "error" in outcome:
        sys.stderr.write(outcome["error"])
        sys.exit(1)
    print(json.dumps(outcome["result"]))


if __name__ == "__main__":
    run()
