"""Master-key rotation with ENCRYPTION_KEY_NEW across restarts."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import Stack, eventually, start_stack
from tests.support.process import LectrProcess, base_env, new_master_key

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "hi"}]


def test_rotation_across_restarts(pg_server, fake, tmp_path):
    name, url = pg_server.create_database()
    old, new = new_master_key(), new_master_key()
    try:
        lectr = start_stack(url, tmp_path, fake, ENCRYPTION_KEY=old)
        stack = Stack(lectr, fake)
        orgs = [stack.new_org(providers=("openai",)) for _ in range(3)]
        lectr.stop_cleanly()

        # rotate: both keys configured; new writes use the new one; DEKs rewrapped
        lectr = start_stack(url, tmp_path, fake, ENCRYPTION_KEY=old, ENCRYPTION_KEY_NEW=new)
        stack = Stack(lectr, fake)
        for org in orgs:
            client = openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key=org.key, max_retries=0)
            assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
        status = eventually(
            lambda: (s := stack.cli_json("rotation", "status")) and s["done"] and s, timeout=30
        )
        assert list(status["rows_by_kek"]) == [status["next_kek"]]
        lectr.stop_cleanly()

        # the new key alone
        lectr = start_stack(url, tmp_path, fake, ENCRYPTION_KEY=new)
        stack = Stack(lectr, fake)
        for org in orgs:
            client = openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key=org.key, max_retries=0)
            assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
        lectr.stop_cleanly()

        # the old key alone no longer opens the vault: one clear line, no start
        proc = LectrProcess(
            base_env(DATABASE_URL=url, ENCRYPTION_KEY=old, LECTR_DATA_DIR=str(tmp_path / "d")),
            cwd=tmp_path,
        )
        assert proc.wait_exit(60) != 0
        lines = [line for line in proc.stderr_lines if line.strip()]
        assert len(lines) == 1 and "ENCRYPTION_KEY" in lines[0], proc.output
        assert old not in proc.output and new not in proc.output
    finally:
        pg_server.drop_database(name)
