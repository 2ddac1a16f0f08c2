"""Second review of authentication: the key cache against the real
PostgreSQL, with changes landing while a lookup is in flight."""

from __future__ import annotations

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from lectr.managers.auth import UNKNOWN, Authenticator
from lectr.managers.orgs import OrgManager, hash_key
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.orgs import OrgStore
from tests import test_jwt


class SlowAnswers(ApiKeyStore):
    """Reads PostgreSQL for real, then holds the answer until ``release``:
    a lookup whose query ran before a change but whose answer arrives
    after the change's notification (a busy pool, a slow network)."""

    def __init__(self, db) -> None:
        super().__init__(db)
        self.queries = 0
        self.read: Deferred = Deferred()  # fires once the first query has read
        self._held: list[Deferred] = []

    async def lookup(self, key_hash):
        self.queries += 1
        found = await super().lookup(key_hash)
        gate: Deferred = Deferred()
        self._held.append(gate)
        if not self.read.called:
            self.read.callback(None)
        await gate
        return found

    def release(self) -> None:
        held, self._held = self._held, []
        for gate in held:
            gate.callback(None)


@pytest.fixture
def orgs(database):
    return OrgManager(OrgStore(database), ApiKeyStore(database))


async def _change(orgs, auth, org, issued, change: str) -> None:
    """Make the change in PostgreSQL, then deliver its notification as the
    change listener would."""
    if change == "revoke":
        await orgs.revoke_key(org.id, issued.key.id)
        auth.key_changed(issued.key.id)
    else:
        await orgs.set_enabled(org.id, False)
        auth.org_changed(org.id)


@pytest.mark.parametrize("change", ["revoke", "disable"])
@pytest_twisted.ensureDeferred
async def test_a_lookup_begun_after_a_change_never_takes_an_answer_read_before_it(
    database, orgs, change
):
    """A request that arrives after a revoke's (or kill switch's)
    notification must see the change, even while a lookup of the same key
    that read PostgreSQL before the change is still in flight: it may not
    join that lookup and take its stale answer."""
    org, issued = await orgs.create_org("Acme")
    store = SlowAnswers(database)
    auth = Authenticator(store, reactor=reactor)
    h = hash_key(issued.plaintext.reveal())
    before = auth.lookup(h)  # a request that came before the change
    await store.read  # its query has read the key as active
    await _change(orgs, auth, org, issued, change)
    assert auth.cached(h) is None
    after = auth.lookup(h)  # a request that came after the notification
    # release the answers (a second query, if one was made, is held too)
    for _ in range(500):
        store.release()
        if after.called and before.called:
            break
        await _tick()
    assert (await before) is not None  # it came first: the old answer is fine for it
    ident = await after
    if change == "revoke":
        assert ident is None, "a request after the revoke's notification was let in"
    else:
        assert ident is not None and ident.org_enabled is False, (
            "a request after the kill switch's notification saw the org enabled"
        )
    assert store.queries == 2
    # and the cache holds the fresh answer, not the stale one
    cached = auth.cached(h)
    if change == "revoke":
        assert cached is UNKNOWN
    else:
        assert cached.org_enabled is False


async def _tick() -> None:
    d: Deferred = Deferred()
    reactor.callLater(0.01, d.callback, None)
    await d


# --- a token's subject names exactly one identity -------------------------------------

# what str.strip() removes that the subject check lets through (no C0 control, no DEL)
_STRIPPED = [" ", "\x85", "\xa0", "\u1680", "\u2003", "\u2028", "\u3000"]


class _Request:
    def __init__(self, token: str) -> None:
        self._value = b"Bearer " + token.encode("ascii")

    def getHeader(self, name: bytes):
        return self._value if name == b"authorization" else None


issuer = test_jwt.issuer  # (the fixture: a local OIDC issuer)


@pytest.fixture
def admin_auth(database, issuer):
    from lectr.admin.auth import AdminAuthenticator, JWKSCache, JWTVerifier, treq_http_get
    from lectr.managers.users import UserManager
    from lectr.storage.members import MemberStore
    from lectr.storage.users import UserStore

    jwks = JWKSCache(issuer.jwks_url, http_get=treq_http_get(reactor), clock=reactor)
    verifier = JWTVerifier(issuer=issuer.issuer, audience=issuer.audience, jwks=jwks)
    users = UserManager(UserStore(database), MemberStore(database))
    return AdminAuthenticator(users=users, verifier=verifier)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    base=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30),
    left=st.lists(st.sampled_from(_STRIPPED), max_size=2).map("".join),
    right=st.lists(st.sampled_from(_STRIPPED), max_size=2).map("".join),
)
@pytest_twisted.ensureDeferred
async def test_a_tokens_subject_is_never_taken_for_another(admin_auth, issuer, base, left, right):
    """Two tokens with different ``sub`` claims are two people: the identity
    a token signs in as is the one with exactly its subject, or the token
    is refused. (``" auth0|alice"`` signing in as ``auth0|alice``, and so
    with her orgs and her admin rights, would let whoever the issuer gives
    such a subject act as her.)"""
    from lectr.errors import Unauthorized

    victim = await admin_auth.authenticate(_Request(issuer.token(base)))
    assert victim.user.subject == base
    variant = left + base + right
    if variant == base:
        return
    try:
        other = await admin_auth.authenticate(_Request(issuer.token(variant)))
    except Unauthorized as e:
        assert e.code == "invalid_token"
        return
    assert other.user.id != victim.user.id, f"sub {variant!r} signed in as {base!r}"
    assert other.user.subject == variant


# --- the rate limit of misses across a clock step ------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_wall_clock_stepped_back_does_not_rate_limit_every_miss(database, orgs):
    """The reactor's clock is the wall clock, which NTP or a resumed VM can
    step back. The miss limiter must not count the step as negative time:
    that would leave it owing hours of tokens, and every key not cached yet
    (a new key, any key after a restart) would get 503 until the clock
    caught up."""
    from twisted.internet.task import Clock

    from lectr.managers.auth import RATE_LIMITED

    org, issued = await orgs.create_org("Acme")
    clock = Clock()
    clock.rightNow = 1_000_000.0
    auth = Authenticator(ApiKeyStore(database), reactor=clock, miss_rate=10, miss_burst=10)
    clock.rightNow -= 3600.0  # the clock is stepped back an hour
    ident = await auth.lookup(hash_key(issued.plaintext.reveal()))
    assert ident is not RATE_LIMITED, "a valid key was not checked after the clock step"
    assert ident.org_id == org.id


@pytest_twisted.ensureDeferred
async def test_a_wall_clock_stepped_back_does_not_hold_back_a_new_signing_key(issuer):
    """The JWKS is refetched for an unknown kid at most once a minute,
    timed on the reactor's (wall) clock. A clock stepped back an hour must
    not mean an hour without a refetch: an issuer that rotates its keys in
    that hour would have every admin sign-in refused."""
    from twisted.internet.task import Clock

    from lectr.admin.auth import JWKSCache, JWTVerifier, treq_http_get

    clock = Clock()
    clock.rightNow = 1_000_000.0
    jwks = JWKSCache(issuer.jwks_url, http_get=treq_http_get(reactor), clock=clock)
    verifier = JWTVerifier(issuer=issuer.issuer, audience=issuer.audience, jwks=jwks)
    await verifier.verify(issuer.token())
    assert issuer.hits == 1
    clock.rightNow -= 3600.0  # the clock is stepped back an hour
    clock.advance(300)  # and time goes on; the issuer rotates in a new key
    issuer.add_key("rsa-2")
    verified = await verifier.verify(issuer.token("auth0|dave", kid="rsa-2"))
    assert verified.subject == "auth0|dave"
    assert issuer.hits == 2
