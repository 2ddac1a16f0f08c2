"""The BYOK vault: organizations' provider keys, envelope-encrypted.

- ``add_key`` checks a key's format, asks the provider whether it works
  (``GET /v1/models``, no redirects) and only then seals and stores it.
- ``pool`` and ``reveal`` are the proxy's hot path: no database, no plaintext
  cache. The sealed rows of every org are kept in memory (refreshed by
  ``provider_key:<org>`` and ``org:<org>`` notifications, fully reloaded after
  a listener reset) as key pools: the enabled keys of an (org, provider) with
  their weights. The key chosen for an attempt is decrypted for that attempt.
- At start-up the configured master keys are checked against the stored rows;
  a wrong ``ENCRYPTION_KEY`` is a :class:`VaultKeyError` (one line), not a
  failure of every later request.
- With ``ENCRYPTION_KEY_NEW`` set, a :class:`lectr.vault.rotation.Rewrapper`
  rewraps every DEK to the new key in small batches (docs/security.md).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger

from lectr.errors import BadRequest, NotFound, Unprocessable, UpstreamUnavailable
from lectr.metrics import Registry
from lectr.providers import ProviderRegistry
from lectr.providers.base import NoOptions
from lectr.storage.custom_providers import ProviderGone
from lectr.storage.provider_keys import (
    NewProviderKey,
    ProviderKeyRecord,
    ProviderKeyStore,
    SealedProviderKey,
)
from lectr.util.deferred import timeout_without_cancel
from lectr.util.secret import Secret
from lectr.util.validate import clean_name, parse_uuid
from lectr.vault.census import Census
from lectr.vault.crypto import Binding, Keyring, Prepared, Sealed
from lectr.vault.errors import DecryptionFailed, UnknownKek, VaultCryptoError, VaultKeyError
from lectr.vault.reloader import OrgCacheReloader
from lectr.vault.rotation import Rewrapper

MIN_KEY_LENGTH = 8
MAX_KEY_LENGTH = 1024
DEFAULT_KEY_NAME = "default"
# rows of each master key tried at start-up before the key is declared wrong
_START_SAMPLE = 3


MAX_WEIGHT = 1000


@dataclass(frozen=True, slots=True)
class ProviderKeyInfo:
    """What listings show: never the key, only its last four characters."""

    id: str
    org_id: str
    provider: str
    name: str
    last4: str
    enabled: bool
    created_at: datetime
    weight: int = 1
    base_url: str | None = None
    api_version: str | None = None


class PoolKey:
    """One enabled key of a pool, as the proxy sees it: its id, name, weight
    and options (base URL, API version); the secret stays sealed until
    :meth:`VaultManager.reveal`."""

    __slots__ = ("id", "name", "weight", "base_url", "api_version", "row")

    def __init__(self, row: SealedProviderKey) -> None:
        self.id = row.id
        self.name = row.name
        self.weight = row.weight
        self.base_url = row.base_url
        self.api_version = row.api_version
        self.row = row

    def __repr__(self) -> str:
        return f"PoolKey(id={self.id!r}, name={self.name!r}, weight={self.weight})"


@dataclass(frozen=True, slots=True)
class RotationStatus:
    current_kek: str  # fingerprint of ENCRYPTION_KEY
    next_kek: str | None  # fingerprint of ENCRYPTION_KEY_NEW, when set
    rows_by_kek: dict[str, int]  # fingerprint -> rows wrapped by it
    done: bool  # no row references a key other than the one new writes use


def _info(r: ProviderKeyRecord) -> ProviderKeyInfo:
    return ProviderKeyInfo(
        r.id,
        r.org_id,
        r.provider,
        r.name,
        r.last4,
        r.enabled,
        r.created_at,
        r.weight,
        r.base_url,
        r.api_version,
    )


def _sealed(row: SealedProviderKey) -> Sealed:
    return Sealed(row.ciphertext, row.nonce, row.wrapped_dek, row.dek_nonce, row.kek_id)


def check_key_format(key: object) -> str:
    """A provider key as typed: printable ASCII without whitespace (it goes
    into an HTTP header verbatim), of a sane length. Messages never echo it."""
    if isinstance(key, Secret):
        key = key.reveal()
    if not isinstance(key, str):
        raise BadRequest("the provider key must be a string")
    if not MIN_KEY_LENGTH <= len(key) <= MAX_KEY_LENGTH:
        raise BadRequest(
            f"the provider key must be {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} characters long"
        )
    for c in key:
        if c.isspace():
            raise BadRequest("the provider key must not contain whitespace")
        if not "\x21" <= c <= "\x7e":
            raise BadRequest(
                "the provider key must contain only printable ASCII characters "
                "(no control characters)"
            )
    return key


API_VERSION_RE = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?|v1|preview|latest")


def check_weight(value: object) -> int:
    if type(value) is not int or not 1 <= value <= MAX_WEIGHT:
        raise BadRequest(f"weight must be a whole number from 1 to {MAX_WEIGHT}")
    return value


def check_base_url(value: object) -> str:
    """An http(s) base URL without credentials, query or fragment."""
    if not isinstance(value, str) or not 1 <= len(value) <= 2048:
        raise BadRequest("base_url must be an http(s) URL")
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise BadRequest("base_url must be an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("base_url must be an http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise BadRequest("base_url must not carry credentials, a query or a fragment")
    if not url.isascii() or any(c.isspace() or ord(c) < 0x21 for c in url):
        raise BadRequest("base_url must be ASCII without spaces or control characters")
    if "/." in parts.path or "\\" in parts.path or "%" in parts.path:
        raise BadRequest("base_url must not contain dot segments or escapes")
    return url


def host_matches(url: str, patterns: tuple[str, ...]) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return any(fnmatchcase(host, p) for p in patterns)


_NO_POOLS: dict[str, tuple[PoolKey, ...]] = {}


class VaultManager:
    _log = Logger()

    def __init__(
        self,
        store: ProviderKeyStore,
        registry: ProviderRegistry,
        *,
        kek: Secret[bytes],
        kek_new: Secret[bytes] | None,
        http_request,
        listener,
        reactor,
        metrics: Registry | None = None,
        validation_timeout: float = 10.0,
        key_base_url_hosts: tuple[str, ...] = (),
        rewrap_batch_size: int = 100,
        rewrap_interval: float = 0.2,
        rewrap_idle_interval: float = 60.0,
        census_interval: float = 10.0,
        census_wait: float = 1.0,
        census_ttl: float | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._keyring = Keyring(kek, kek_new)
        self._http_request = http_request
        self._listener = listener
        self._reactor = reactor
        self._validation_timeout = validation_timeout
        self._key_base_url_hosts = key_base_url_hosts
        # org id -> provider -> the pool: enabled keys, newest first
        self._cache: dict[str, dict[str, tuple[PoolKey, ...]]] = {}
        # rows that failed to open, by id -> the wrapping that failed (logged once)
        self._broken: dict[str, bytes] = {}
        # row id -> associated data computed once (not secret); see provider_key
        self._prepared: dict[str, Prepared] = {}
        self._running = False
        self._stopped = False
        self._reloader = OrgCacheReloader(
            "provider key",
            load_orgs=self._load_orgs,
            load_all=self._load_all,
            reactor=reactor,
        )
        metrics = metrics or Registry()
        self._m_decrypt_failures = metrics.counter(
            "lectr_vault_decrypt_failures_total",
            "Stored provider keys that failed to decrypt (wrong master key or damaged rows)",
        )
        self._m_validations = metrics.counter(
            "lectr_provider_key_validations_total",
            "Provider keys checked with their provider before storage, by outcome",
            ["provider", "outcome"],
        )
        metrics.callback_gauge(
            "lectr_vault_cached_keys",
            "Enabled provider keys held (sealed) in memory",
            lambda: sum(len(rows) for org in self._cache.values() for rows in org.values()),
            mode="livemax",  # every worker holds the same keys
        )
        self._census = (
            Census(self._keyring.fingerprints, store.announce, reactor=reactor)
            if listener is not None
            else None
        )
        self._rewrapper = (
            Rewrapper(
                store,
                self._keyring,
                reactor=reactor,
                on_rewrapped=self._reloader.org_changed,
                metrics=metrics,
                batch_size=rewrap_batch_size,
                interval=rewrap_interval,
                idle_interval=rewrap_idle_interval,
                census=self._census,
                census_interval=census_interval,
                census_wait=census_wait,
                census_ttl=census_ttl,
                binding=self._binding,
            )
            if self._keyring.next is not None
            else None
        )

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Check the master keys against the stored rows, load the sealed
        rows, follow changes, and start rewrapping when ENCRYPTION_KEY_NEW is
        set. Raises :class:`VaultKeyError` when the keys do not fit."""
        if self._listener is not None:
            # subscribe first: a change made while loading is reloaded after
            self._listener.subscribe("provider_key", self._on_change)
            self._listener.subscribe("org", self._on_change)
            self._listener.on_reset(self._on_reset)
        try:
            if self._census is not None:
                # say which keys this node holds before reading any row, so a
                # rotating node holds back while this one cannot read new wrappings
                self._census.subscribe(self._listener)
                await self._census.announce()
            await self._check_master_keys()
            await self._load_all()
        except BaseException:
            await self.stop()  # leave the census, drop queued reloads
            raise
        self._running = True
        self._reloader.start()
        ring = self._keyring
        self._log.info(
            "vault: {n} provider keys loaded; master key {current}{rotation}",
            n=sum(len(rows) for org in self._cache.values() for rows in org.values()),
            current=ring.current.fingerprint,
            rotation=f", rewrapping to {ring.next.fingerprint}" if ring.next else "",
        )
        if self._rewrapper is not None:
            self._rewrapper.start()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._running = False
        if self._rewrapper is not None:
            await self._rewrapper.stop()
        self._reloader.stop()
        if self._census is not None:
            self._census.close()
            try:
                await timeout_without_cancel(
                    ensureDeferred(self._census.goodbye()), 2.0, self._reactor
                )
            except CancelledError:
                raise
            except Exception as e:  # shutting down: peers forget this node after their ttl
                self._log.info("vault census: no goodbye sent ({error})", error=type(e).__name__)

    async def _check_master_keys(self) -> None:
        ring = self._keyring
        counts = await self._store.count_by_kek()
        names = f"ENCRYPTION_KEY is {ring.current.fingerprint}"
        if ring.next is not None:
            names += f", ENCRYPTION_KEY_NEW is {ring.next.fingerprint}"
        unknown = {k: n for k, n in counts.items() if ring.get(k) is None}
        if unknown:
            kek_id, _ = max(unknown.items(), key=lambda kv: kv[1])
            total = sum(unknown.values())
            which = f"key fingerprint {kek_id}" + (
                f" and {len(unknown) - 1} other(s)" if len(unknown) > 1 else ""
            )
            if len(unknown) < len(counts) and ring.next is None:
                # some rows open, others need a key this node lacks: a rotation
                # started elsewhere, or was cut short
                raise VaultKeyError(
                    f"{total} stored provider key(s) are wrapped by a master key this node "
                    f"does not hold ({which}; {names}): a master-key rotation is under way or "
                    "unfinished; give this node both keys, ENCRYPTION_KEY=<old key> and "
                    "ENCRYPTION_KEY_NEW=<new key>"
                )
            if ring.next is not None and ring.current.fingerprint in counts:
                # ENCRYPTION_KEY opens some rows: it is the other key that is wrong
                raise VaultKeyError(
                    f"ENCRYPTION_KEY_NEW does not match the master key that protects {total} "
                    f"stored provider key(s) ({which}; {names}), while ENCRYPTION_KEY opens the "
                    "others: set ENCRYPTION_KEY_NEW to the new key the rotation under way "
                    "started with"
                )
            raise VaultKeyError(
                f"ENCRYPTION_KEY does not match the master key that protects {total} stored "
                f"provider key(s) ({which}; {names}): set ENCRYPTION_KEY to the master key "
                "they were stored with"
            )
        for kek_id in counts:
            rows = await self._store.sample(kek_id, _START_SAMPLE)
            # (the question is the master key: a v1 wrapping counts whatever
            # the row's options, which only decide whether the key is used)
            opened = any(
                ring.can_unwrap(replace(self._binding(r), legacy=True), _sealed(r)) for r in rows
            )
            if rows and not opened:
                raise VaultKeyError(
                    f"the master key with fingerprint {kek_id} does not unwrap the stored "
                    f"provider keys ({names}); the provider_keys table may be damaged or "
                    "restored from another installation"
                )

    # --- the hot path ---------------------------------------------------------------

    def pool(self, org_id: str, provider: str) -> tuple[PoolKey, ...]:
        """The enabled keys of an org for a provider, newest first (empty when
        there are none). Never touches the database."""
        return self._cache.get(org_id, _NO_POOLS).get(provider, ())

    def reveal(self, key: PoolKey) -> Secret[str] | None:
        """One pool key decrypted now, in memory, for one attempt; None when it
        cannot be decrypted (logged once, counted, and skipped from then on).
        The plaintext is not kept (its data key is, while the key is in the
        cache: :class:`~lectr.vault.crypto.Prepared`)."""
        row = key.row
        if self._broken and self._broken.get(row.id) == row.wrapped_dek:
            return None
        prepared = self._prepared.get(row.id)
        if prepared is None or prepared.wrapped_dek is not row.wrapped_dek:
            prepared = Prepared(self._binding(row), _sealed(row))
            if key in self._cache.get(row.org_id, _NO_POOLS).get(row.provider, ()):
                # kept (with its data key, once it opens) only for a key still in
                # the cache: one that left it since it was picked is not put back
                self._prepared[row.id] = prepared
        try:
            plaintext = self._keyring.open_prepared(prepared).decode("ascii")
        except VaultCryptoError as e:
            self._mark_broken(row, e)
            return None
        except UnicodeDecodeError:  # authentic, yet not a key Lectr would have stored
            self._mark_broken(row, DecryptionFailed("the decrypted key is not ASCII"))
            return None
        return Secret(plaintext)

    def usable(self, key: PoolKey) -> bool:
        """False once a key is known not to decrypt (until its row changes)."""
        broken = self._broken.get(key.id) if self._broken else None
        return broken is None or broken != key.row.wrapped_dek

    def provider_key(self, org_id: str, provider: str) -> Secret[str] | None:
        """The newest usable key of the pool, decrypted (tools and tests)."""
        for key in self.pool(org_id, provider):
            secret = self.reveal(key)
            if secret is not None:
                return secret
        return None

    def _mark_broken(self, row: SealedProviderKey, e: VaultCryptoError) -> None:
        self._broken[row.id] = row.wrapped_dek
        self._m_decrypt_failures.inc()
        hint = (
            "this node lacks the master key it names (set ENCRYPTION_KEY_NEW on every node)"
            if isinstance(e, UnknownKek)
            else "the row is damaged or was moved"
        )
        self._log.error(
            "vault: provider key {key_id} of org {org_id} ({provider}) cannot be decrypted: "
            "{reason}; {hint}. It is skipped.",
            key_id=row.id,
            org_id=row.org_id,
            provider=row.provider,
            reason=str(e),
            hint=hint,
        )

    def _binding(self, row: SealedProviderKey) -> Binding:
        """What the row's sealed key is bound to: its org, provider, id and
        options. A wrapping made before options were bound (v1) is accepted
        only when the row's options are ones an org admin could have given
        (no base URL, or one on the provider's hosts): a base URL written
        into the database by anyone else makes the key unusable rather than
        sending it there. Not on the hot path (once per row and reload)."""
        return Binding(
            row.org_id,
            row.provider,
            row.id,
            row.base_url,
            row.api_version,
            legacy=row.base_url is None or self._admin_could_set(row),
        )

    def _admin_could_set(self, row: SealedProviderKey) -> bool:
        p = self._registry.get(row.provider)
        if p is None:
            return False
        try:
            self._key_options(p, row.base_url, row.api_version)
        except BadRequest:
            return False
        return True

    # --- the cache -----------------------------------------------------------------

    @staticmethod
    def _group(rows: list[SealedProviderKey]) -> dict[str, dict[str, tuple[PoolKey, ...]]]:
        grouped: dict[str, dict[str, list[PoolKey]]] = {}
        for row in rows:  # already newest first
            grouped.setdefault(row.org_id, {}).setdefault(row.provider, []).append(PoolKey(row))
        return {
            org: {p: tuple(rs) for p, rs in by_provider.items()}
            for org, by_provider in grouped.items()
        }

    async def _load_all(self) -> None:
        rows = await self._store.load_enabled()
        self._cache = self._group(rows)
        live = {r.id for r in rows}
        self._forget([k for k in (*self._prepared, *self._broken) if k not in live])

    async def _load_orgs(self, org_ids: list[str]) -> None:
        rows = await self._store.load_enabled(org_ids)
        grouped = self._group(rows)
        before = {
            key.id
            for o in org_ids
            for keys in self._cache.get(o, _NO_POOLS).values()
            for key in keys
        }
        for org_id in org_ids:
            if org_id in grouped:
                self._cache[org_id] = grouped[org_id]
            else:
                self._cache.pop(org_id, None)
        self._forget(before.difference(r.id for r in rows))

    def _forget(self, ids) -> None:
        """Drop what is kept about keys that left the cache (deleted or
        disabled): their failure marks, and their prepared form with its
        unwrapped data key."""
        for key_id in ids:
            self._prepared.pop(key_id, None)
            self._broken.pop(key_id, None)

    def _on_change(self, org_id: str) -> None:
        self._reloader.org_changed(org_id)

    def _on_reset(self) -> None:
        self._reloader.reset()

    async def _refresh(self, org_id: str) -> None:
        """This process's own write: have the cache reflect it before the call
        returns. The write is committed either way, so a slow or failed reload
        is only logged (the reloader retries)."""
        try:
            await timeout_without_cancel(self._reloader.refresh(org_id), 5.0, self._reactor)
        except CancelledError:
            raise
        except Exception as e:  # OperationTimedOut, DatabaseUnavailable…: the reloader retries
            self._log.warn(
                "vault: provider key cache of org {org_id} not refreshed yet ({error})",
                org_id=org_id,
                error=type(e).__name__,
            )

    # --- administration ----------------------------------------------------------------

    def _provider_name(self, provider: object) -> str:
        if not isinstance(provider, str) or provider not in self._registry:
            raise BadRequest(
                f"unknown provider; expected one of: {', '.join(self._registry.names())}"
            )
        return provider

    def _key_options(
        self, p, base_url: object, api_version: object
    ) -> tuple[str | None, str | None]:
        """Check a key's own base URL and API version against what its
        provider accepts: org admins never point Lectr at an arbitrary host."""
        if base_url is not None:
            # only providers whose keys name their own resource (Azure) take
            # one; LECTR_KEY_BASE_URL_HOSTS adds hosts for those providers
            if not p.key_base_url_hosts:
                raise BadRequest(f"{p.display_name} keys cannot carry a base_url")
            base_url = check_base_url(base_url)
            host_ok = p.check_key_base_url(base_url) or host_matches(
                base_url, self._key_base_url_hosts
            )
            if not host_ok:
                allowed = ", ".join(p.key_base_url_hosts + self._key_base_url_hosts)
                raise BadRequest(
                    f"base_url must name a host of {p.display_name} ({allowed}); operators can "
                    "allow more with LECTR_KEY_BASE_URL_HOSTS"
                )
            if base_url.startswith("http://") and not host_matches(
                base_url, self._key_base_url_hosts
            ):
                raise BadRequest("base_url must use https")
        elif p.base_url is None:
            raise BadRequest(f"{p.display_name} keys need a base_url (the resource's endpoint)")
        if api_version is not None:
            if not p.accepts_api_version:
                raise BadRequest(f"{p.display_name} keys cannot carry an api_version")
            if not isinstance(api_version, str) or not API_VERSION_RE.fullmatch(api_version):
                raise BadRequest("api_version must look like 2024-10-21 or 2025-01-01-preview")
        return base_url, api_version

    async def add_key(
        self,
        org_id: object,
        provider: object,
        key: object,
        name: object = None,
        *,
        weight: object = None,
        base_url: object = None,
        api_version: object = None,
    ) -> ProviderKeyInfo:
        """Validate ``key`` with its provider, then seal and store it in the
        org's pool for that provider."""
        org_id = parse_uuid(org_id, "organization")
        provider = self._provider_name(provider)
        plaintext = check_key_format(key)
        name = DEFAULT_KEY_NAME if name is None else clean_name(name, "key name")
        weight = 1 if weight is None else check_weight(weight)
        p = self._registry[provider]
        base_url, api_version = self._key_options(p, base_url, api_version)
        if not await self._store.org_exists(org_id):
            raise NotFound("organization not found")

        result = await p.validate_key(
            Secret(plaintext),
            self._http_request,
            timeout=self._validation_timeout,
            options=NoOptions(base_url, api_version),
        )
        if not result.valid:
            if result.reachable:
                outcome = "refused"
            else:
                outcome = "unreachable" if result.status is None else "error"
            self._m_validations.inc(1, provider, outcome)
            self._log.info(
                "provider key for org {org_id} not stored: {provider} {outcome} ({status})",
                org_id=org_id,
                provider=provider,
                outcome=outcome,
                status=result.status,
            )
            if result.reachable:
                raise Unprocessable(
                    f"{p.display_name} refused the key: {result.reason}",
                    code="provider_key_refused",
                )
            raise UpstreamUnavailable(
                f"the key could not be checked: {result.reason}; nothing was stored",
                code="provider_unreachable" if result.status is None else "provider_error",
            )
        self._m_validations.inc(1, provider, "accepted")

        record_id = str(uuid.uuid4())
        binding = Binding(org_id, provider, record_id, base_url, api_version)
        ring = self._keyring
        kek = ring.write_kek
        if self._rewrapper is not None and not self._rewrapper.new_key_readable_everywhere():
            # a running node lacks ENCRYPTION_KEY_NEW and could not open the key:
            # seal it with the old one; the rotation rewraps it with the others
            kek = ring.current
        sealed = ring.seal(binding, plaintext.encode(), kek)
        insert = self._store.insert(
            NewProviderKey(
                id=record_id,
                org_id=org_id,
                provider=provider,
                name=name,
                last4=plaintext[-4:],
                ciphertext=sealed.ciphertext,
                nonce=sealed.nonce,
                wrapped_dek=sealed.wrapped_dek,
                dek_nonce=sealed.dek_nonce,
                kek_id=sealed.kek_id,
                weight=weight,
                base_url=base_url,
                api_version=api_version,
            ),
            custom=not self._registry.is_builtin(provider),
        )
        try:
            record = await insert
        except ProviderGone:
            raise NotFound(f"provider '{provider}' not found (it was deleted meanwhile)") from None
        if record is None:
            raise NotFound("organization not found")
        self._log.info(
            "provider key {key_id} ({provider}) stored for org {org_id}",
            key_id=record.id,
            provider=provider,
            org_id=org_id,
        )
        await self._refresh(org_id)
        return _info(record)

    async def list_keys(self, org_id: object) -> list[ProviderKeyInfo]:
        org_id = parse_uuid(org_id, "organization")
        records = await self._store.list(org_id)
        if not records and not await self._store.org_exists(org_id):
            raise NotFound("organization not found")
        return [_info(r) for r in records]

    async def delete_key(self, org_id: object, key_id: object) -> None:
        org_id = parse_uuid(org_id, "organization")
        key_id = parse_uuid(key_id, "provider key")
        if not await self._store.delete(org_id, key_id):
            raise NotFound("provider key not found")
        self._log.info(
            "provider key {key_id} of org {org_id} deleted", key_id=key_id, org_id=org_id
        )
        await self._refresh(org_id)

    async def update_key(
        self,
        org_id: object,
        key_id: object,
        *,
        enabled: object = None,
        weight: object = None,
        name: object = None,
    ) -> ProviderKeyInfo:
        """Enable or disable a key (without deleting it), change its weight in
        the pool, or rename it."""
        org_id = parse_uuid(org_id, "organization")
        key_id = parse_uuid(key_id, "provider key")
        if enabled is not None and not isinstance(enabled, bool):
            raise BadRequest("enabled must be true or false")
        record = await self._store.update(
            org_id,
            key_id,
            enabled=enabled,
            weight=None if weight is None else check_weight(weight),
            name=None if name is None else clean_name(name, "key name"),
        )
        if record is None:
            raise NotFound("provider key not found")
        await self._refresh(org_id)
        return _info(record)

    async def set_key_enabled(
        self, org_id: object, key_id: object, enabled: bool
    ) -> ProviderKeyInfo:
        """Disable a key without deleting it (or enable it again)."""
        return await self.update_key(org_id, key_id, enabled=bool(enabled))

    async def rotation_status(self) -> RotationStatus:
        ring = self._keyring
        counts = await self._store.count_by_kek()
        write = ring.write_kek.fingerprint
        return RotationStatus(
            current_kek=ring.current.fingerprint,
            next_kek=ring.next.fingerprint if ring.next else None,
            rows_by_kek=counts,
            done=all(kek_id == write for kek_id, n in counts.items() if n),
        )
