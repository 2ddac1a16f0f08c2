"""Authentication timing against a wall clock that steps.

The reactor's clock is the wall clock (``time.time``), which NTP can step
either way and a VM resumed from a snapshot or from suspension can jump.
What these caches time is an age (how old are the signing keys, the
discovery document, the memory that a key hash is unknown) or a hold-off
(may the issuer be asked again yet): a step must never make old data look
fresh, nor turn into a storm of refetches. A JWT's ``exp``/``nbf`` stay on
the wall clock (they are wall-clock claims) and are not tested here.

The wall clock is a ``task.Clock`` (``wall``); where the steady clock
matters it is a second one (``steady``), which moves with real time only:
``elapse`` moves both, ``step`` the wall clock alone.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock, deferLater

from lectr.admin.auth import JWKSCache, JWTVerifier, Moment, treq_http_get
from lectr.admin.signin import DiscoveryUnavailable, OIDCDiscovery
from lectr.errors import Unauthorized
from lectr.managers.auth import UNKNOWN, Authenticator
from lectr.managers.orgs import OrgManager, hash_key
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.orgs import OrgStore
from tests.support.oidc import LocalIssuer, SigningKey

DAY = 86_400.0
HOUR = 3_600.0


class Clocks:
    def __init__(self) -> None:
        self.wall = Clock()
        self.wall.rightNow = 1_800_000_000.0
        self.steady = Clock()
        self.steady.rightNow = 5_000.0

    def elapse(self, seconds: float) -> None:
        """Real time passes: both clocks move."""
        self.wall.advance(seconds)
        self.steady.advance(seconds)

    def step(self, seconds: float) -> None:
        """The wall clock alone is stepped (NTP, a resumed VM)."""
        self.wall.rightNow += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest_twisted.async_yield_fixture
async def issuer():
    iss = await LocalIssuer.start()
    yield iss
    await iss.stop()


def _verifier(issuer, clocks: Clocks, *, steady: bool) -> JWTVerifier:
    """``steady=False``: the default steady clock (real time, which hardly
    moves during a test): only the wall clock tells time."""
    extra = {"steady_clock": clocks.steady.seconds} if steady else {}
    jwks = JWKSCache(issuer.jwks_url, http_get=treq_http_get(reactor), clock=clocks.wall, **extra)
    return JWTVerifier(issuer=issuer.issuer, audience=issuer.audience, jwks=jwks)


async def _settle() -> None:
    """Let a background fetch over loopback finish."""
    for _ in range(50):
        await deferLater(reactor, 0.01)


async def _refused(verifier: JWTVerifier, token: str) -> str:
    with pytest.raises(Unauthorized) as info:
        await verifier.verify(token)
    return info.value.message


# --- the JWKS: a rotated-out key ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_wall_clock_stepped_back_does_not_keep_a_rotated_out_key_fresh(issuer, clocks):
    """Keys fetched a day ago are refreshed, even though the wall clock,
    stepped back a day since, reads a time before that fetch. Measured on
    the wall clock alone they were "minus 22 hours" old, never past the
    hour's max age, and a key the issuer rotated out (revoked, leaked)
    stayed accepted until the clock caught up."""
    verifier = _verifier(issuer, clocks, steady=False)
    await verifier.verify(issuer.token())
    assert issuer.hits == 1
    issuer.key("rsa-1").published = False  # rotated out by the issuer
    clocks.step(-DAY)
    clocks.wall.advance(2 * HOUR)
    # the cached key still serves this request while the keys are refreshed
    assert (await verifier.verify(issuer.token())).subject == "auth0|alice"
    await _settle()
    assert issuer.hits == 2, "keys two hours old (a day by the stepped clock) were not refreshed"
    assert "unknown key" in await _refused(verifier, issuer.token())
    # and the step costs one refresh, not one per request
    for _ in range(5):
        await verifier.verify(issuer.token(kid="ec-1"))
    await _settle()
    assert issuer.hits == 2


@pytest_twisted.ensureDeferred
async def test_a_step_back_nobody_saw_does_not_keep_old_keys_fresh(issuer, clocks):
    """No admin request while the wall clock reads before the fetch (an idle
    night): when it has caught up, it says the keys are ten minutes old,
    though a day and ten minutes have passed. The steady clock knows, so
    the rotated-out key is dropped at the next request."""
    verifier = _verifier(issuer, clocks, steady=True)
    await verifier.verify(issuer.token())
    issuer.key("rsa-1").published = False
    clocks.step(-DAY)
    clocks.elapse(DAY + 600)  # the wall clock reads 10 min after the fetch again
    await verifier.verify(issuer.token())
    await _settle()
    assert issuer.hits == 2, "keys a day old passed for ten minutes old"
    assert "unknown key" in await _refused(verifier, issuer.token())


@pytest_twisted.ensureDeferred
async def test_a_machine_resumed_after_a_day_refreshes_its_keys_once(issuer, clocks):
    """Suspended for a day: the wall clock jumps forward, a monotonic clock
    may not have moved at all. The keys are refreshed (once), and the
    jump does not make every request, or every unknown kid, a refetch."""
    verifier = _verifier(issuer, clocks, steady=True)
    await verifier.verify(issuer.token())
    issuer.key("rsa-1").published = False
    clocks.step(DAY)  # the steady clock stood still (time.monotonic does, suspended)
    await verifier.verify(issuer.token())
    await _settle()
    assert issuer.hits == 2
    assert "unknown key" in await _refused(verifier, issuer.token())
    for _ in range(10):
        await verifier.verify(issuer.token(kid="ec-1"))
        await _refused(verifier, issuer.token(kid="rsa-1"))
        clocks.elapse(1)
    await _settle()
    assert issuer.hits == 2  # within the hold-off: no storm


@pytest_twisted.ensureDeferred
async def test_a_clock_stepped_back_costs_one_fetch_not_a_storm(issuer, clocks):
    """Unknown kids right after a step back: one refetch (the step makes
    the last attempt's time meaningless), then the hold-off holds again."""
    verifier = _verifier(issuer, clocks, steady=True)
    await verifier.verify(issuer.token())
    issuer.add_key("rsa-9", published=False)
    clocks.step(-HOUR)
    for _ in range(10):
        await _refused(verifier, issuer.token(kid="rsa-9"))
        await verifier.verify(issuer.token())
        clocks.elapse(1)
    assert issuer.hits == 2


# --- the JWKS: any sequence of steps (the cache's timing, with an in-memory issuer) -------

_KEY = SigningKey("k1", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
_JWKS = json.dumps({"keys": [_KEY.jwk()]}).encode()

#: seconds: anything up to days, and whole minutes and hours (a step back of
#: about as long as the time that then passes is the tricky case)
_minutes = st.integers(-24 * 60, 24 * 60).map((60.0).__mul__)
_events = st.lists(
    st.one_of(
        st.tuples(st.just("elapse"), st.floats(0, 3 * HOUR) | _minutes.map(abs)),
        st.tuples(
            st.just("step"),
            (st.floats(-3 * DAY, 3 * DAY) | _minutes).filter(lambda s: s != 0),
        ),
        st.tuples(st.just("known"), st.just(0.0)),
        st.tuples(st.just("unknown"), st.just(0.0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, database=None)
@given(events=_events)
@example(events=[("step", -1.5 * HOUR), ("elapse", 2 * HOUR), ("known", 0.0)])
@example(events=[("step", DAY), ("known", 0.0), ("unknown", 0.0), ("step", -DAY), ("known", 0.0)])
def test_keys_are_never_older_than_their_max_age_whatever_the_clock_does(events):
    """For any sequence of wall-clock steps, time passing and lookups: after
    a lookup, the keys in use were fetched at most ``max_age`` seconds of
    real time ago; and the issuer was asked at most once per step and per
    refetch interval of real time (plus the first fetch): the steps never
    make a storm."""
    clocks = Clocks()
    fetched_at = None  # real time (the steady clock) of the last fetch
    fetches = 0

    async def get(url: str, timeout: float):
        nonlocal fetched_at, fetches
        fetches += 1
        fetched_at = clocks.steady.seconds()
        return 200, _JWKS

    jwks = JWKSCache(
        "https://id.example.com/jwks",
        http_get=get,
        clock=clocks.wall,
        steady_clock=clocks.steady.seconds,
        refetch_interval=60,
        max_age=HOUR,
    )
    jwks.start()
    started = clocks.steady.seconds()
    steps = 0
    for kind, value in events:
        if kind == "elapse":
            clocks.elapse(value)
        elif kind == "step":
            clocks.step(value)
            steps += 1
        else:
            d = ensureDeferred(jwks.key_for("k1" if kind == "known" else "zz"))
            assert d.called  # (the in-memory issuer answers at once)
            d.addErrback(lambda f: f.trap(Unauthorized))
            if kind == "known":
                age = clocks.steady.seconds() - fetched_at
                assert age <= HOUR, f"keys {age:.0f} s old still in use"
    real = clocks.steady.seconds() - started
    # between two fetches, a step or a refetch interval of real time
    assert fetches <= 1 + steps + real // 60


# --- OIDC discovery -----------------------------------------------------------------------

ISSUER = "https://id.example.com/"
DOC = json.dumps(
    {
        "issuer": ISSUER,
        "authorization_endpoint": "https://id.example.com/authorize",
        "token_endpoint": "https://id.example.com/oauth/token",
        "code_challenge_methods_supported": ["S256"],
    }
).encode()


class FakeIssuer:
    def __init__(self) -> None:
        self.answers: list = []
        self.calls = 0

    async def get(self, url: str, timeout: float):
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else (200, DOC)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest_twisted.ensureDeferred
async def test_discovery_is_retried_after_a_clock_stepped_back(clocks):
    """The issuer was down at start-up; the wall clock is then stepped back
    an hour. The retry comes after 30 s, not after an hour and 30 s of
    "sign-in unavailable" on the dashboard."""
    issuer = FakeIssuer()
    issuer.answers.append(ConnectionRefusedError())
    discovery = OIDCDiscovery(ISSUER, http_get=issuer.get, clock=clocks.wall, retry_interval=30)
    discovery.start()
    with pytest.raises(DiscoveryUnavailable):
        await discovery.endpoints()
    clocks.step(-HOUR)
    clocks.wall.advance(30)
    assert (await discovery.endpoints()).token_endpoint.endswith("/oauth/token")
    assert issuer.calls == 2


@pytest_twisted.ensureDeferred
async def test_discovery_is_refreshed_after_a_clock_stepped_back(clocks):
    """A document two hours old is refreshed although the wall clock, stepped
    back a day, reads a time before its fetch; once, not at every call."""
    issuer = FakeIssuer()
    discovery = OIDCDiscovery(ISSUER, http_get=issuer.get, clock=clocks.wall)
    discovery.start()
    await discovery.endpoints()
    assert issuer.calls == 1
    clocks.step(-DAY)
    clocks.wall.advance(2 * HOUR)
    for _ in range(5):
        await discovery.endpoints()
        clocks.wall.advance(1)
    assert issuer.calls == 2


@pytest_twisted.ensureDeferred
async def test_discovery_after_a_step_back_nobody_saw_is_refreshed(clocks):
    issuer = FakeIssuer()
    discovery = OIDCDiscovery(
        ISSUER, http_get=issuer.get, clock=clocks.wall, steady_clock=clocks.steady.seconds
    )
    discovery.start()
    clocks.step(-DAY)
    clocks.elapse(DAY + 600)
    await discovery.endpoints()
    assert issuer.calls == 2, "a document a day old passed for ten minutes old"


def test_an_age_is_never_shorter_than_either_clock_says_nor_known_before_its_moment():
    at = Moment(wall=1000.0, steady=50.0)
    assert at.age(Moment(1010.0, 55.0)) == 10.0  # a step forward: the wall clock's
    assert at.age(Moment(1002.0, 60.0)) == 10.0  # a step back since: the steady clock's
    assert at.age(Moment(999.0, 50.0)) == float("inf")  # before it: unknown, old


# --- the proxy's negative cache ---------------------------------------------------------


class ReadBeforeCommit(ApiKeyStore):
    """The first lookup answers "unknown", as one that read PostgreSQL just
    before the key's creation committed would; later ones read for real."""

    def __init__(self, db) -> None:
        super().__init__(db)
        self.lookups = 0

    async def lookup(self, key_hash):
        self.lookups += 1
        if self.lookups == 1:
            return None
        return await super().lookup(key_hash)


@pytest_twisted.ensureDeferred
async def test_a_clock_stepped_back_does_not_keep_a_key_unknown_for_the_step(database, clocks):
    """A hash found unknown is remembered for 5 s. With the wall clock
    stepped back an hour, its expiry lay an hour and 5 s ahead: a key
    created meanwhile got 401 for an hour on this node."""
    orgs = OrgManager(OrgStore(database), ApiKeyStore(database))
    org, issued = await orgs.create_org("Acme")
    store = ReadBeforeCommit(database)
    auth = Authenticator(store, reactor=clocks.wall, negative_ttl=5.0)
    h = hash_key(issued.plaintext.reveal())
    assert await auth.lookup(h) is None
    assert auth.cached(h) is UNKNOWN
    clocks.step(-HOUR)
    clocks.wall.advance(6)
    assert auth.cached(h) is None, "an unknown hash outlived its 5 s by the clock's step"
    ident = await auth.lookup(h)
    assert ident is not None and ident.org_id == org.id
    assert store.lookups == 2


class NothingKnown:
    async def lookup(self, key_hash):
        return None


@settings(max_examples=300, deadline=None, database=None)
@given(
    events=st.lists(
        st.one_of(
            st.tuples(st.just("elapse"), st.floats(0, 30)),
            st.tuples(st.just("step"), st.floats(-DAY, DAY).filter(lambda s: s != 0)),
        ),
        max_size=30,
    )
)
@example(events=[("step", -HOUR), ("elapse", 3.0), ("elapse", 3.0), ("elapse", 3.0)])
def test_an_unknown_hash_is_served_for_at_most_its_ttl_per_step_back(events):
    """Whatever the wall clock does (consulted after each event, as the
    proxy does with every request): the real time an unknown hash is
    answered from memory is at most the TTL, plus at most one TTL per
    step back (a step within the 5 s cannot be told from time passing)."""
    wall = Clock()
    wall.rightNow = 1_800_000_000.0
    auth = Authenticator(NothingKnown(), reactor=wall, negative_ttl=5.0)
    h = hash_key("lc_00000000-0000-4000-8000-000000000000")
    d = auth.lookup(h)
    assert d.called and d.result is None
    served = 0.0
    back_steps = 0
    for kind, value in events:
        if kind == "elapse":
            wall.advance(value)
        else:
            wall.rightNow += value
            back_steps += value < 0
        if auth.cached(h) is UNKNOWN and kind == "elapse":
            served += value
    assert served <= 5.0 * (1 + back_steps)


# --- the admin API's request durations ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_admin_call_across_a_step_back_records_no_negative_duration():
    """The duration histogram took the reactor's (wall) clock: a call during
    which NTP stepped the clock back an hour observed -3600 s, and the
    histogram's _sum went down, which Prometheus reads as a counter reset."""
    from twisted.web.test.requesthelper import DummyRequest

    from lectr.admin.api import Dispatcher, Operation, Permission, ok
    from lectr.metrics import Registry

    clock = Clock()
    clock.advance(1_800_000_000)
    metrics = Registry()

    async def authorize(principal, permission, org_id):
        return SimpleNamespace(principal=None, org_id=None)

    dispatcher = Dispatcher(
        authenticator=None,
        users=SimpleNamespace(authorize=authorize),
        metrics=metrics,
        clock=clock,
    )
    op = Operation(
        "GET",
        "/healthz",
        "health",
        Permission.PUBLIC,
        "",
        "",
        ("health",),
        None,
        False,
        (),
        {200: None},
        (),
    )

    async def handler(owner, request, call):
        clock.advance(-3600)  # stepped back while the call ran
        return ok({"status": "ok"})

    request = DummyRequest([b"healthz"])
    request.content = io.BytesIO(b"")
    await dispatcher.run(op, handler, None, request, {})
    text = metrics.render()
    assert 'lectr_admin_requests_total{operation="health",status="200"} 1.0' in text, text
    (total,) = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('lectr_admin_request_seconds_sum{operation="health"}')
    ]
    assert 0 <= total < 60, text


@pytest_twisted.ensureDeferred
async def test_a_new_keys_notification_forgets_that_its_hash_was_unknown(database, clocks):
    """A key's creation is announced as ``key:<id>``. Only ``org:`` cleared
    the negative cache, so a client that tried its new key at once, on a
    node whose lookup read just before the creation committed, got 401
    for the negative TTL after the node had heard of the key."""
    orgs = OrgManager(OrgStore(database), ApiKeyStore(database))
    org, _ = await orgs.create_org("Acme")
    store = ReadBeforeCommit(database)
    auth = Authenticator(store, reactor=clocks.wall, negative_ttl=5.0)
    created = await orgs.create_key(org.id, "ci")
    h = hash_key(created.plaintext.reveal())
    assert await auth.lookup(h) is None  # read just before the commit
    assert auth.cached(h) is UNKNOWN
    auth.key_changed(created.key.id)  # the creation's notification arrives
    assert auth.cached(h) is None
    ident = await auth.lookup(h)
    assert ident is not None and ident.key_id == created.key.id


# --- provider key cool-downs ----------------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(
    status=st.sampled_from([401, 403, 429]),
    retry_after=st.one_of(st.none(), st.floats(0, 7200)),
    step=st.floats(-DAY, -2.0),
    wait=st.floats(0, DAY),
    start=st.floats(1_700_000_000, 1_900_000_000),
)
@example(status=401, retry_after=None, step=-HOUR, wait=0.0, start=1_800_000_000.0)
def test_a_cooldown_never_outlasts_its_length_when_the_clock_steps_back(
    status, retry_after, step, wait, start
):
    """A cool-down ends at a reactor (wall-clock) time: stepped back an hour,
    a key refused for 5 minutes stayed set aside for an hour and 5 minutes -
    a pool of one key answered 503 all that time. Now, whenever a request
    looks after the step, what is left is never more than the cool-down's
    own length (and a second: a step shorter than that cannot be told from
    a rounding)."""
    from lectr.policy.health import KeyHealth

    clock = Clock()
    clock.rightNow = start
    health = KeyHealth(clock)
    seconds = health.cool("k", "openai", status, retry_after)
    clock.rightNow += step  # NTP steps the clock back
    clock.advance(wait)
    assert health.remaining("k") <= seconds + 1.0
    clock.advance(seconds + 1.0)
    assert health.healthy("k") and health.cooldown("k") is None
    # a new answer sets it aside again, for its own length
    assert health.cool("k", "openai", 429, 30.0) == 30.0
    assert not health.healthy("k")


def test_a_cooldown_holds_for_its_length_without_a_step():
    from lectr.policy.health import KeyHealth

    clock = Clock()
    clock.rightNow = 1_800_000_000.123
    health = KeyHealth(clock)
    for seconds in (0.1, 0.3, 7.7, 300.0):
        health.cool("k", "openai", 429, seconds)
        clock.advance(seconds * 0.99)
        assert not health.healthy("k"), seconds
        clock.advance(seconds * 0.02)
        assert health.healthy("k"), seconds
