"""A cap holds across nodes, through the proxy: two ``twistd lectr`` processes
on one PostgreSQL, four clients (two per node) hammering one key with an
rpm cap of 100. Each minute admits between 100 and 100 + N × L (N = 2 nodes,
L = 5, the lease of a 100 cap at LECTR_LIMITS_LEASE_FRACTION 0.05; see
docs/limits.md). CI runs it for a few seconds; LECTR_LIMITS_CLUSTER_SECONDS=60
runs the issue's minute."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from tests.support.fake_provider import OPENAI_KEY
from tests.support.process import FakeProviderProcess, LectrProcess, base_env, new_master_key

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "cluster-admin-token-0123456789"
CAP = 100
BOUND = 2 * 5  # nodes × lease
SECONDS = float(os.environ.get("LECTR_LIMITS_CLUSTER_SECONDS", "8"))


def call(url: str, body=None, token: str = TOKEN, method: str = "POST") -> tuple[int, dict | None]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, None


def test_two_nodes_share_one_rpm_cap(pg_server, tmp_path):
    name, db_url = pg_server.create_database()
    fake = FakeProviderProcess()
    master = new_master_key()
    nodes = []
    try:
        for i in range(2):
            (tmp_path / f"node{i}").mkdir()
            nodes.append(
                LectrProcess(
                    base_env(
                        DATABASE_URL=db_url,
                        ENCRYPTION_KEY=master,
                        LECTR_ADMIN_TOKEN=TOKEN,
                        LECTR_OPENAI_BASE_URL=fake.origin + "/openai",
                        LECTR_DATA_DIR=str(tmp_path / f"node{i}" / "data"),
                    ),
                    cwd=tmp_path / f"node{i}",
                )
            )
        for node in nodes:
            node.wait_ready()
        admin = nodes[0].url("admin", "")
        status, org = call(admin + "/admin/orgs", {"name": "Cluster"})
        assert status == 201
        org_id, key = org["org"]["id"], org["key"]["key"]
        status, _ = call(
            admin + f"/admin/orgs/{org_id}/provider-keys", {"provider": "openai", "key": OPENAI_KEY}
        )
        assert status == 201
        status, _ = call(
            admin + f"/admin/orgs/{org_id}/keys/{org['key']['id']}/limits",
            {"rpm": CAP},
            method="PUT",
        )
        assert status == 200
        time.sleep(1.5)  # the change reaches the other node (NOTIFY)

        admitted: list[float] = []
        refused = Counter()
        lock = threading.Lock()
        stop_at = time.time() + SECONDS
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}

        def client(node: LectrProcess) -> None:
            url = node.url("proxy", "/v1/chat/completions")
            while time.time() < stop_at:
                status, _ = call(url, body, token=key)
                with lock:
                    if status == 200:
                        admitted.append(time.time())
                    else:
                        refused[status] += 1

        threads = [threading.Thread(target=client, args=(nodes[i % 2],)) for i in range(4)]
        started = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 30)
        per_minute = Counter(int(t // 60) for t in admitted)
        covered = Counter()  # seconds of each minute the run covered
        for second in range(int(started), int(stop_at)):
            covered[second // 60] += 1
        print(
            f"admitted per minute {dict(per_minute)}; refusals {dict(refused)}; covered {dict(covered)}"
        )
        assert set(refused) <= {429}
        for minute, n in per_minute.items():
            assert n <= CAP + BOUND, (minute, n)
        for minute, seconds in covered.items():
            if seconds >= 3:  # long enough for the hammering clients to reach the cap
                assert per_minute[minute] >= CAP, (minute, per_minute[minute])
    finally:
        for node in nodes:
            node.stop()
        fake.stop()
        pg_server.drop_database(name)
