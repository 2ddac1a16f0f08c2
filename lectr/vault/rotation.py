"""Master-key rotation: rewrap every DEK from ``ENCRYPTION_KEY`` to
``ENCRYPTION_KEY_NEW`` while traffic continues.

A ``LoopingCall`` takes small batches of rows still wrapped by the old key
(locked with ``SKIP LOCKED``, so every process of every node can help without
waiting on the others), unwraps each DEK and wraps it again with the new key.
The provider-key ciphertext is never touched. Each UPDATE requires the row to
still name the KEK it was read with, so a batch is idempotent and a crash
between batches loses nothing. Each batch notifies the orgs it touched, so
every node's cache picks the new wrapping up; both keys open rows meanwhile.

While any running node lacks the new key (the census, lectr.vault.census),
the job waits and says so. When no row names the old key any more, the log
says so and what to do next.
The loop then only re-checks now and then (a node that was not yet given
``ENCRYPTION_KEY_NEW`` may still write rows with the old key), and keeps
probing the census, which decides the key new rows are sealed with.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from lectr.db.database import DatabaseUnavailable
from lectr.metrics import Registry
from lectr.storage.provider_keys import ProviderKeyStore, Rewrapped, SealedProviderKey
from lectr.vault.census import Census
from lectr.vault.crypto import Binding, Keyring, Sealed
from lectr.vault.errors import VaultCryptoError

PROGRESS_LOG_INTERVAL = 10.0


def _bound(row: SealedProviderKey) -> Binding:
    return Binding(row.org_id, row.provider, row.id, row.base_url, row.api_version)


class Rewrapper:
    _log = Logger()

    def __init__(
        self,
        store: ProviderKeyStore,
        keyring: Keyring,
        *,
        reactor,
        on_rewrapped: Callable[[str], None] | None = None,
        metrics: Registry | None = None,
        batch_size: int = 100,
        interval: float = 0.2,
        idle_interval: float = 60.0,
        census: Census | None = None,
        census_interval: float = 10.0,
        census_wait: float = 1.0,
        census_ttl: float | None = None,
        binding: Callable[[SealedProviderKey], Binding] | None = None,
    ) -> None:
        if keyring.next is None:
            raise ValueError("nothing to rotate to: ENCRYPTION_KEY_NEW is not set")
        self._store = store
        self._keyring = keyring
        self._reactor = reactor
        self._on_rewrapped = on_rewrapped
        self._batch_size = batch_size
        self._interval = interval
        self._idle_interval = idle_interval
        self._target = keyring.next
        # what a row is bound to (the vault's rule for rows wrapped before
        # options were bound); the new wrapping binds the row's options
        self._binding = binding or _bound
        self._sources = sorted(k for k in keyring.fingerprints if k != self._target.fingerprint)
        self._skip: set[str] = set()  # rows whose DEK does not unwrap (logged once each)
        self._census = census
        self._census_interval = census_interval
        self._census_wait = census_wait
        self._census_ttl = (
            census_ttl if census_ttl is not None else 3 * census_interval + census_wait
        )
        self._probed_at: float | None = None
        self._census_ready_at = 0.0
        self._blocked: frozenset[str] = frozenset()
        self._loop = LoopingCall(self._tick_safely)
        self._loop.clock = reactor
        self._loop_done: Deferred | None = None
        self._in_flight: Deferred | None = None
        self.done = False  # no row names the old key (as of the last check)
        self._idle_until = 0.0
        self._started_at: float | None = None
        self._rewrapped_total = 0
        self._last_progress_log = 0.0
        registry = metrics or Registry()
        self._m_rewrapped = registry.counter(
            "lectr_vault_rewrapped_total", "Data keys rewrapped to ENCRYPTION_KEY_NEW"
        )
        self._m_failures = registry.counter(
            "lectr_vault_rewrap_failures_total", "Rewrap batches that failed (retried)"
        )
        registry.callback_gauge(
            "lectr_vault_rotation_blocking_nodes",
            "Running nodes without ENCRYPTION_KEY_NEW, holding the rotation back",
            lambda: len(self._blocked),
            mode="livemax",  # every worker sees the same nodes
        )

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._started_at = self._reactor.seconds()
        self._last_progress_log = self._started_at
        self._log.info(
            "master-key rotation: rewrapping stored provider keys from {old} to {new} "
            "(ENCRYPTION_KEY_NEW) in batches of {batch}",
            old=", ".join(self._sources),
            new=self._target.fingerprint,
            batch=self._batch_size,
        )
        self._loop_done = self._loop.start(self._interval, now=True)
        self._loop_done.addErrback(lambda f: self._log.failure("rewrap loop stopped", f))

    async def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        in_flight = self._in_flight
        if in_flight is not None and not in_flight.called:
            in_flight.cancel()
            try:
                await in_flight
            except CancelledError:
                pass

    # --- the loop ------------------------------------------------------------------

    def _tick_safely(self) -> Deferred:
        # A LoopingCall stops for good on its first failure: never let one through.
        d = ensureDeferred(self._tick())
        self._in_flight = d

        def failed(f):
            if f.check(CancelledError):
                return None
            self._m_failures.inc()
            if f.check(DatabaseUnavailable):
                self._log.warn(
                    "master-key rotation: a rewrap batch failed; retrying ({error})",
                    error=str(f.value),
                )
            else:
                self._log.failure("master-key rotation: a rewrap batch failed; retrying", f)
            return None

        d.addErrback(failed)
        return d

    async def _tick(self) -> None:
        now = self._reactor.seconds()
        if now < self._idle_until:
            # nothing to rewrap for now, but keys are still being stored: keep
            # hearing from every node (else they are forgotten after the ttl,
            # and a node started since without the new key would not count)
            census = self._census
            if census is not None and now - (self._probed_at or 0.0) >= self._census_interval:
                self._probed_at = now  # (a failed probe waits for the next interval)
                await census.probe()
            return
        if not await self._census_allows(now):
            return
        n = await self.run_once()
        if n and self.done:
            self._log.warn(
                "master-key rotation: {n} provider key(s) were stored with the old master key "
                "after the rotation completed and have been rewrapped; is ENCRYPTION_KEY_NEW "
                "set on every node?",
                n=n,
            )
        elif n and now - self._last_progress_log >= PROGRESS_LOG_INTERVAL:
            self._last_progress_log = now
            self._log.info(
                "master-key rotation: {n} provider keys rewrapped so far", n=self._rewrapped_total
            )
        if n >= self._batch_size:
            return  # more to do: next batch at the next tick
        await self._check_done()

    async def _census_allows(self, now: float) -> bool:
        """Rewrap only while every node heard from holds the new key."""
        census = self._census
        if census is None:
            return True
        if self._probed_at is None or now - self._probed_at >= self._census_interval:
            first = self._probed_at is None
            await census.probe()
            self._probed_at = now
            if first:  # give every node the time to answer before the first batch
                self._census_ready_at = now + self._census_wait
        if now < self._census_ready_at:
            return False
        blockers = frozenset(census.lacking(self._target.fingerprint, self._census_ttl))
        if blockers:
            if blockers != self._blocked:
                self._log.warn(
                    "master-key rotation waiting: {n} running node(s) do not hold "
                    "ENCRYPTION_KEY_NEW ({new}) and could not read rewrapped keys; set "
                    "ENCRYPTION_KEY_NEW on every node (nodes: {nodes})",
                    n=len(blockers),
                    new=self._target.fingerprint,
                    nodes=", ".join(sorted(blockers)),
                )
            self._blocked = blockers
            return False
        if self._blocked:
            self._log.info("master-key rotation resumes: every running node holds the new key")
            self._blocked = frozenset()
        return True

    def new_key_readable_everywhere(self) -> bool:
        """Whether every running node can open what the new key wraps, so
        that a key stored now may be sealed with it: no census (one
        process), or the census has had its first answers and no node
        heard from lacks the new key. Otherwise a new key is sealed with
        the old one, and rewrapped with the other rows."""
        census = self._census
        if census is None:
            return True
        if self._probed_at is None or self._reactor.seconds() < self._census_ready_at:
            return False
        return not census.lacking(self._target.fingerprint, self._census_ttl)

    async def run_once(self) -> int:
        """Rewrap one batch; the number of rows rewrapped."""
        done = await self._store.rewrap_batch(
            self._sources, self._batch_size, self._rewrap, sorted(self._skip)
        )
        if done:
            self._m_rewrapped.inc(len(done))
            self._rewrapped_total += len(done)
            if self._on_rewrapped is not None:
                for org_id in sorted({org_id for _, org_id in done}):
                    self._on_rewrapped(org_id)
        return len(done)

    def _rewrap(self, row: SealedProviderKey) -> Rewrapped | None:
        binding = self._binding(row)
        sealed = Sealed(row.ciphertext, row.nonce, row.wrapped_dek, row.dek_nonce, row.kek_id)
        try:
            new = self._keyring.rewrap(binding, sealed, self._target)
        except VaultCryptoError as e:
            self._skip.add(row.id)
            self._log.error(
                "master-key rotation: provider key {key_id} of org {org_id} cannot be "
                "rewrapped ({reason}); it is left as it is: delete it and add the key again",
                key_id=row.id,
                org_id=row.org_id,
                reason=str(e),
            )
            return None
        return Rewrapped(row.id, new.wrapped_dek, new.dek_nonce, new.kek_id)

    async def _check_done(self) -> None:
        counts = await self._store.count_by_kek()
        target = self._target.fingerprint
        left = {k: n for k, n in counts.items() if k != target and n}
        now = self._reactor.seconds()
        if not left:
            if not self.done:
                elapsed = now - (self._started_at or now)
                self._log.info(
                    "master-key rotation complete: no stored provider key references the old "
                    "master key any more ({n} rewrapped by this process in {elapsed:.1f}s). "
                    "Next: set ENCRYPTION_KEY to the value of ENCRYPTION_KEY_NEW, remove "
                    "ENCRYPTION_KEY_NEW, and restart every Lectr node; the old key can then "
                    "be destroyed.",
                    n=self._rewrapped_total,
                    elapsed=elapsed,
                )
            self.done = True
            self._idle_until = now + self._idle_interval
            return
        self.done = False
        movable = {k: n for k, n in left.items() if k in self._sources}
        if movable and sum(movable.values()) > len(self._skip):
            return  # rows appeared (another node's write, or locked by a peer): go on
        # what remains cannot be moved by this process: say so, then check rarely
        self._log.warn(
            "master-key rotation stalled: {n} provider key(s) are still wrapped by "
            "{keks}, which this process cannot rewrap (damaged rows, or a master key it "
            "does not hold); see the errors above",
            n=sum(left.values()),
            keks=", ".join(sorted(left)),
        )
        self._idle_until = now + self._idle_interval
