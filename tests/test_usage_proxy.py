"""Usage accounting through the real proxy: every request becomes exactly one
row with exact counts; include_usage is injected upstream and its chunk
removed from what the client receives; a disconnect records partial usage;
a PostgreSQL outage during a burst loses and duplicates nothing."""

from __future__ import annotations

import json
import time
from io import BytesIO

import psycopg2
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers

from lectr.usage.model import Usage
from tests.support.fake_provider import (
    ANTHROPIC_KEY,
    OPENAI_KEY,
    FakeProviderServer,
    Script,
    openai_chat_stream,
    openai_completions_stream,
)
from tests.support.lectr_service import admin_url, proxy_url, start_lectr
from tests.support.process import new_master_key
from tests.support.tcp_forward import TcpForwarder
from tests.support.waiting import eventually, sleep

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}
ANTHROPIC_HEADERS = {"anthropic-version": ["2023-06-01"]}


class Gateway:
    def __init__(self, service, fake, org, key: str) -> None:
        self.service = service
        self.c = service.components
        self.fake = fake
        self.provider = fake.resource
        self.org = org
        self.key = key

    def url(self, path: str) -> str:
        return proxy_url(self.service, path)

    def headers(self, extra=None) -> dict:
        h = {"content-type": ["application/json"], "authorization": [f"Bearer {self.key}"]}
        h.update(extra or {})
        return h

    async def post(self, path: str, body, headers=None, raw: bool = False):
        data = body if raw else json.dumps(body).encode()
        resp = await treq.post(
            self.url(path), data=data, headers=self.headers(headers), persistent=False
        )
        return resp, await resp.content()

    async def rows(self) -> dict:
        """Every request row of the org, by request id (after a flush)."""
        await self.c.recorder.flush_now()
        page = await self.c.usage.recent_requests(self.org.id, limit=200)
        return {e.request_id: e for e in page.items}

    async def row(self, rid: str):
        """Request ``rid``'s row, once recorded (a client's disconnect is
        recorded when the proxy notices it)."""
        rows: dict = {}

        async def recorded() -> bool:
            rows.update(await self.rows())
            return rid in rows

        await eventually(recorded)
        return rows[rid]


async def make_gateway(db_url, tmp_path, **env) -> Gateway:
    fake = await FakeProviderServer.start()
    service = await start_lectr(db_url, tmp_path, fake, **env)
    c = service.components
    org, issued = await c.orgs.create_org("Acme")
    await c.vault.add_key(org.id, "openai", OPENAI_KEY, name="main")
    await c.vault.add_key(org.id, "anthropic", ANTHROPIC_KEY, name="main")
    fake.resource.reset()
    return Gateway(service, fake, org, issued.plaintext.reveal())


@pytest_twisted.async_yield_fixture
async def gw(db_url, tmp_path):
    gateway = await make_gateway(db_url, tmp_path)
    yield gateway
    await gateway.service.stopService()
    await gateway.fake.stop()


def request_id(resp) -> str:
    return resp.headers.getRawHeaders(b"x-lectr-request-id")[0].decode()


def usage_of(entry) -> Usage:
    return Usage(
        entry.prompt_tokens,
        entry.completion_tokens,
        entry.total_tokens,
        entry.cached_tokens,
        entry.cache_creation_tokens,
        entry.usage_source,
    )


class Collect(Protocol):
    def __init__(self, on_data=None) -> None:
        self.data: list[bytes] = []
        self.done: Deferred = Deferred()
        self.on_data = on_data

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)
        if self.on_data is not None:
            self.on_data(self)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)


async def open_stream(gw: Gateway, path: str, body: dict, headers=None, on_data=None):
    agent = Agent(reactor)
    response = await agent.request(
        b"POST",
        gw.url(path).encode(),
        Headers(gw.headers(headers)),
        FileBodyProducer(BytesIO(json.dumps(body).encode())),
    )
    collect = Collect(on_data)
    response.deliverBody(collect)
    return response, collect


# --- one row per request, exact counts ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_each_kind_of_request_is_one_row_with_its_usage(gw):
    expected = {}

    resp, _ = await gw.post("/v1/chat/completions", CHAT)
    expected[request_id(resp)] = (200, False, Usage(12, 5, 17, 0, None, "provider"))

    resp, collect = await open_stream(gw, "/v1/chat/completions", {**CHAT, "stream": True})
    await collect.done
    expected[request_id(resp)] = (200, True, Usage(12, 5, 17, 0, None, "provider"))

    resp, _ = await gw.post("/v1/messages", MESSAGE, ANTHROPIC_HEADERS)
    expected[request_id(resp)] = (200, False, Usage(10, 5, 15, 0, 0, "provider"))

    resp, collect = await open_stream(
        gw, "/anthropic/v1/messages", {**MESSAGE, "stream": True}, ANTHROPIC_HEADERS
    )
    await collect.done
    expected[request_id(resp)] = (200, True, Usage(10, 5, 15, 0, 0, "provider"))

    resp, collect = await open_stream(
        gw, "/v1/responses", {"model": "gpt-4o", "input": "hi", "stream": True}
    )
    await collect.done
    expected[request_id(resp)] = (200, True, Usage(9, 4, 13, 0, None, "provider"))

    resp, _ = await gw.post(
        "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]}
    )
    expected[request_id(resp)] = (200, False, Usage(16, None, 16, None, None, "provider"))

    resp = await treq.get(gw.url("/v1/models"), headers=gw.headers(), persistent=False)
    await resp.content()
    expected[request_id(resp)] = (200, False, Usage())

    resp, _ = await gw.post("/v1/chat/completions", b"{not json", raw=True)
    assert resp.code == 400
    expected[request_id(resp)] = (400, False, Usage())

    rows = await gw.rows()
    assert set(rows) == set(expected)
    for rid, (status, streamed, usage) in expected.items():
        row = rows[rid]
        assert (row.status, row.streamed, usage_of(row)) == (status, streamed, usage), row
        assert row.latency_ms > 0
    chat = rows[next(iter(expected))]
    assert chat.model == "gpt-4o-mini"
    assert chat.provider == "openai" and chat.path == "/v1/chat/completions"
    assert chat.method == "POST" and chat.key_id is not None and chat.ttfb_ms is not None
    assert gw.c.metrics.get("lectr_usage_rows_written_total").value() == len(expected)


@pytest_twisted.ensureDeferred
async def test_an_answer_is_sent_before_its_request_is_recorded(gw, monkeypatch):
    """Reading the usage, pricing, the row and the metrics never hold an
    answer back: when a request is recorded, its answer's last bytes are
    in the kernel already (nothing of it pending on the connection), JSON,
    stream or Lectr's own refusal, and the row is still written."""
    from lectr.proxy.call import Call

    pending_then = []
    latency = {}
    record = Call._record

    def recording(call):
        pending_then.append(call.req._proto._pending)
        # (its latency: when its answer was complete, not when recorded)
        latency[call.rid] = (call.done_at - call.t0) * 1000.0
        return record(call)

    monkeypatch.setattr(Call, "_record", recording)
    # (kept alive, as SDKs keep them: a connection closed after its answer
    # sends what it holds at once anyway)
    pool = HTTPConnectionPool(reactor, persistent=True)
    try:
        answers = []
        # a JSON answer, a stream, and Lectr's own refusal (a body it cannot judge)
        for data in (CHAT, {**CHAT, "stream": True}, b'{"model": "a", "model": "b"}'):
            resp = await treq.post(
                gw.url("/v1/chat/completions"),
                data=data if isinstance(data, bytes) else json.dumps(data).encode(),
                headers=gw.headers(None),
                pool=pool,
            )
            await resp.content()
            answers.append(resp)
    finally:
        await pool.closeCachedConnections()
    resp, resp2, refused = answers
    assert refused.code == 400
    assert [r.headers.getRawHeaders("connection") for r in answers] == [None] * 3  # (kept alive)
    await eventually(lambda: len(pending_then) == 3)
    assert pending_then == [None, None, None]
    rows = await gw.rows()
    assert usage_of(rows[request_id(resp)]) == Usage(12, 5, 17, 0, None, "provider")
    assert usage_of(rows[request_id(resp2)]) == Usage(12, 5, 17, 0, None, "provider")
    assert rows[request_id(refused)].status == 400
    for rid, ms in latency.items():
        assert rows[rid].latency_ms == pytest.approx(ms, abs=0.01)


@pytest_twisted.ensureDeferred
async def test_include_usage_is_injected_upstream_and_removed_for_the_client(gw):
    events = openai_chat_stream(
        "gpt-4o-mini", ["a", "b", "c"], True, prompt=40, cached=32, cid="c9", created=5
    )
    without = openai_chat_stream(
        "gpt-4o-mini", ["a", "b", "c"], False, prompt=40, cached=32, cid="c9", created=5
    )
    gw.provider.next(Script(events=events))
    resp, collect = await open_stream(
        gw, "/v1/chat/completions", {**CHAT, "stream": True, "temperature": 0.5}
    )
    await collect.done
    [usage_event] = [e for e in events if b'"choices":[]' in e]
    # the client gets exactly the stream it would have had without Lectr's
    # include_usage: no usage chunk, no "usage": null members
    assert b"".join(collect.data) == b"".join(without)
    assert usage_event not in b"".join(collect.data)
    [seen] = gw.provider.calls("openai")
    sent = seen.json()
    assert sent["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        **CHAT,
        "stream": True,
        "temperature": 0.5,
    }
    assert seen.header("accept-encoding") == "identity"
    row = (await gw.rows())[request_id(resp)]
    assert usage_of(row) == Usage(40, 3, 43, 32, None, "provider")


@pytest_twisted.ensureDeferred
async def test_a_client_that_asked_for_usage_gets_its_chunk(gw):
    events = openai_chat_stream("gpt-4o-mini", ["a"], True, prompt=8)
    gw.provider.next(Script(events=events))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    resp, collect = await open_stream(gw, "/v1/chat/completions", body)
    await collect.done
    assert b"".join(collect.data) == b"".join(events)
    assert gw.provider.calls("openai")[0].json() == body
    row = (await gw.rows())[request_id(resp)]
    assert usage_of(row) == Usage(8, 1, 9, 0, None, "provider")


@pytest_twisted.ensureDeferred
async def test_openai_sdk_streams_see_no_usage_chunk_unless_they_ask(gw):
    import openai

    base = gw.url("/v1")

    def run(include_usage: bool):
        client = openai.OpenAI(api_key=gw.key, base_url=base, max_retries=0)
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                **extra,
            )
        )
        client.close()
        return chunks

    plain = await deferToThread(run, False)
    assert all(c.choices for c in plain)  # no usage-only chunk
    assert all(c.usage is None for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "Hello from the fake"
    asked = await deferToThread(run, True)
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 5
    rows = await gw.rows()
    assert sorted(r.usage_source for r in rows.values()) == ["provider", "provider"]
    assert {r.completion_tokens for r in rows.values()} == {5}


@pytest_twisted.ensureDeferred
async def test_a_legacy_completions_stream_is_metered_exactly_and_unchanged_for_the_client(gw):
    import openai

    def run():
        client = openai.OpenAI(api_key=gw.key, base_url=gw.url("/v1"), max_retries=0)
        chunks = list(
            client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=True)
        )
        client.close()
        return chunks

    chunks = await deferToThread(run)
    assert "".join(c.choices[0].text for c in chunks) == "Hello from the fake"
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    [seen] = gw.provider.calls("openai")
    assert seen.json()["stream_options"] == {"include_usage": True}
    # byte for byte what the provider would have sent without Lectr's request
    words = gw.provider.stream_words
    resp, collect = await open_stream(
        gw, "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": True}
    )
    await collect.done
    assert b"".join(collect.data) == b"".join(
        openai_completions_stream("gpt-3.5-turbo-instruct", words, False)
    )
    rows = await gw.rows()
    assert [usage_of(r) for r in rows.values()] == [Usage(7, 5, 12, None, None, "provider")] * 2
    assert {r.path for r in rows.values()} == {"/v1/completions"}


# --- disconnects ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_disconnect_mid_stream_records_partial_usage(gw):
    gw.provider.stream_interval = 0.05
    gw.provider.stream_words = [f"w{i}" for i in range(40)]

    def hang_up_after_five(collect: Collect) -> None:
        if sum(d.count(b"data: ") for d in collect.data) >= 6:  # the role chunk + 5 words
            collect.transport.stopProducing()

    resp, collect = await open_stream(
        gw, "/v1/chat/completions", {**CHAT, "stream": True}, on_data=hang_up_after_five
    )
    await collect.done
    rid = request_id(resp)

    row = await gw.row(rid)
    assert row.status == 499
    assert row.error_type == "client_disconnected"
    assert row.usage_source == "estimated"
    assert 5 <= row.completion_tokens < 40
    # the prompt's count arrives at the end of an OpenAI stream: estimated
    # from the request's size (about 4 bytes a token), never left empty
    body_bytes = len(json.dumps({**CHAT, "stream": True}).encode())
    assert row.prompt_tokens == -(-body_bytes // 4) and row.streamed
    assert row.cost_usd is not None  # priced as an estimate, never as 0


@pytest_twisted.ensureDeferred
async def test_a_cut_json_answer_never_takes_a_nested_usage_for_the_providers_report(gw):
    """A JSON answer cut right after a tool input the model wrote - ending in
    a ``"usage"`` object, so the cut body ends in ``}}`` like a whole answer
    - is estimated, not read as the provider's report (0 tokens: free)."""
    tool = {
        "type": "tool_use",
        "id": "t1",
        "name": "stats",
        "input": {"usage": {"input_tokens": 0}},
    }
    whole = json.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "x" * 400}, tool],
            "usage": {"input_tokens": 5000, "output_tokens": 900},
        },
        separators=(",", ":"),
    ).encode()
    cut = whole[: whole.index(b'{"input_tokens":0}') + len(b'{"input_tokens":0}}')]
    gw.provider.next(Script(stall_after=cut, headers={"content-type": "application/json"}))

    def hang_up(collect: Collect) -> None:
        if sum(map(len, collect.data)) >= len(cut):
            collect.transport.stopProducing()

    resp, collect = await open_stream(
        gw, "/v1/messages", MESSAGE, ANTHROPIC_HEADERS, on_data=hang_up
    )
    await collect.done
    assert b"".join(collect.data) == cut
    rid = request_id(resp)

    row = await gw.row(rid)
    assert row.status == 499
    assert row.usage_source == "estimated"
    assert row.completion_tokens == 100  # the 400 bytes of text it had delivered


@pytest_twisted.ensureDeferred
async def test_anthropic_disconnect_keeps_the_input_tokens(gw):
    gw.provider.stream_interval = 0.05
    gw.provider.stream_words = ["word "] * 40

    def hang_up(collect: Collect) -> None:
        if sum(d.count(b"content_block_delta") for d in collect.data) >= 6:
            collect.transport.stopProducing()

    resp, collect = await open_stream(
        gw, "/v1/messages", {**MESSAGE, "stream": True}, ANTHROPIC_HEADERS, on_data=hang_up
    )
    await collect.done
    rid = request_id(resp)

    row = await gw.row(rid)
    assert (row.status, row.usage_source, row.prompt_tokens) == (499, "estimated", 10)
    assert 3 <= row.completion_tokens < 40


# --- PostgreSQL outage under load ------------------------------------------------------------


async def burst(gw: Gateway, n: int, concurrency: int = 20) -> tuple[list[str], list, list[float]]:
    """``n`` chat requests (every other one streamed), ``concurrency`` at a
    time: their request ids, the failures, the latencies."""
    ids: list[str] = []
    errors: list = []
    latencies: list[float] = []
    pending = list(range(n))

    async def worker():
        while pending:
            i = pending.pop()
            body = {**CHAT, "stream": i % 2 == 0}
            started = time.perf_counter()
            try:
                resp, content = await gw.post("/v1/chat/completions", body)
            except Exception as e:
                errors.append(repr(e))
                continue
            latencies.append(time.perf_counter() - started)
            if resp.code != 200:
                errors.append((resp.code, content[:200]))
            ids.append(request_id(resp))

    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
    return ids, errors, latencies


async def settle(gw: Gateway) -> list[str]:
    """Let the set-up's change notifications arrive (they evict cached keys),
    then use the key once: this node has it cached before PostgreSQL goes."""
    await sleep(0.5)
    ids, errors, _ = await burst(gw, 1, 1)
    assert errors == []
    return ids


def stored_ids(db_url: str) -> list[str]:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT request_id::text FROM request_logs")
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_postgresql_outage_during_a_burst_loses_and_duplicates_nothing(db_url, tmp_path):
    fwd = await TcpForwarder.in_front_of(db_url)
    gw = await make_gateway(fwd.rewrite(db_url), tmp_path)
    recorder = gw.c.recorder
    metrics = gw.c.metrics
    try:
        before = await settle(gw)
        more, errors_before, normal = await burst(gw, 299)
        before += more
        await recorder.flush_now()

        fwd.go_down()  # PostgreSQL "crashes" mid-traffic
        during, errors_during, latencies = await burst(gw, 600)
        await eventually(lambda: not recorder.database_writable)
        # every row of the outage reaches the journal (none waits in memory;
        # a write already waiting on the dead connection spills when it stalls)
        spilled_total = metrics.get("lectr_usage_rows_spilled_total")
        await eventually(lambda: spilled_total.value() == len(during), timeout=30)
        assert recorder.buffered == 0
        assert recorder.journal.size > 0

        fwd.come_back()
        after, errors_after, _ = await burst(gw, 100)
        await eventually(
            lambda: recorder.database_writable and not recorder.journal.segments(),
            timeout=60,
        )
        await recorder.flush_now()

        sent = before + during + after
        assert errors_before + errors_during + errors_after == []
        ids = stored_ids(db_url)
        assert len(ids) == len(set(ids)), "duplicate rows"
        assert set(ids) == set(sent)
        assert len(sent) == 1000
        dropped = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.render().splitlines()
            if line.startswith("lectr_usage_rows_dropped_total{")
        )
        assert dropped == 0
        # (rows recorded just after PostgreSQL came back may be spilled too:
        # the recorder retries it with backoff)
        spilled = metrics.get("lectr_usage_rows_spilled_total").value()
        assert metrics.get("lectr_usage_rows_replayed_total").value() == spilled

        def p50_p99(values: list[float]) -> str:
            values = sorted(values)
            return (
                f"{values[len(values) // 2] * 1000:.1f}/"
                f"{values[int(len(values) * 0.99)] * 1000:.1f} ms"
            )

        print(
            f"\noutage: {len(sent)} requests ({len(during)} during the outage), "
            f"{len(errors_before + errors_during + errors_after)} proxy errors, "
            f"{len(ids)} rows after recovery, {len(ids) - len(set(ids))} duplicates, "
            f"{spilled:.0f} rows spilled and replayed; p50/p99 latency "
            f"{p50_p99(normal)} before, {p50_p99(latencies)} during the outage"
        )
    finally:
        await gw.service.stopService()
        await gw.fake.stop()
        await fwd.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_rows_spilled_at_shutdown_are_replayed_by_the_next_start(db_url, tmp_path):
    master_key = new_master_key()
    fwd = await TcpForwarder.in_front_of(db_url)
    gw = await make_gateway(fwd.rewrite(db_url), tmp_path, ENCRYPTION_KEY=master_key)
    try:
        warm = await settle(gw)
        fwd.go_down()
        ids, errors, _ = await burst(gw, 50)
        assert errors == []
        ids += warm
    finally:
        await gw.service.stopService()  # PostgreSQL still down: the rows go to the journal
        await gw.fake.stop()
        await fwd.stop()
    assert stored_ids(db_url) == []
    # the next start, with PostgreSQL back, replays them
    service = await start_lectr(db_url, tmp_path, ENCRYPTION_KEY=master_key)
    try:
        recorder = service.components.recorder
        await eventually(lambda: not recorder.journal.segments(), timeout=30)
        assert sorted(stored_ids(db_url)) == sorted(ids)
    finally:
        await service.stopService()


# --- service wiring ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_shutdown_writes_the_last_rows_and_metrics_are_exposed(db_url, tmp_path):
    gw = await make_gateway(db_url, tmp_path)
    try:
        ids, errors, _ = await burst(gw, 30, 5)
        assert errors == []
        resp = await treq.get(admin_url(gw.service, "/metrics"), persistent=False)
        text = (await resp.content()).decode()
        for name in (
            "lectr_usage_rows_buffered",
            "lectr_usage_rows_written_total",
            "lectr_usage_rows_spilled_total",
            "lectr_usage_rows_replayed_total",
            "lectr_usage_rows_dropped_total",
            "lectr_usage_flush_seconds",
        ):
            assert f"# TYPE {name} " in text
        assert "lectr_usage_rows_recorded_total 30" in text
    finally:
        # no flush first: stopping writes what is still buffered
        await gw.service.stopService()
        await gw.fake.stop()
    assert sorted(stored_ids(db_url)) == sorted(ids)


@pytest_twisted.ensureDeferred
async def test_a_failure_counting_the_attempt_still_records_the_request(gw, monkeypatch):
    """Each part of recording a request runs whatever happened to the one
    before, and the call leaves the active set last (a drain waits for the
    row): a fault counting the attempt is logged, and the row is written."""
    from lectr.proxy.call import Call

    def broken(call, outcome, status):
        raise RuntimeError("counting failed")

    monkeypatch.setattr(Call, "_attempt_over", broken)
    seen_active = []
    record = Call._record

    def recording(call):
        seen_active.append(call in call.h.active)
        return record(call)

    monkeypatch.setattr(Call, "_record", recording)
    resp, _ = await gw.post("/v1/chat/completions", CHAT)
    assert resp.code == 200
    rows = await gw.rows()
    assert usage_of(rows[request_id(resp)]) == Usage(12, 5, 17, 0, None, "provider")
    assert seen_active == [True]
    assert gw.c.proxy.active == set()
