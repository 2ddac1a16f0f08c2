"""The composition root: builds and runs Lectr.

Start order (each step awaited, each failure one clear line and a non-zero
exit): the proxy and admin sockets are bound (``lectr.tap`` binds them even
earlier, before the development secrets are made) → database (embedded
PostgreSQL when no DATABASE_URL) → migrations → change listener → managers
and caches → the bound sockets are adopted by the proxy and admin sites. Stop
order is the reverse: ports first (in-flight requests drain), the database
last.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.server import Site

from lectr.config import Config, ConfigError
from lectr.db import migrate
from lectr.db.database import Database, DatabaseUnavailable
from lectr.db.embedded import EmbeddedDatabaseError, EmbeddedPostgres
from lectr.db.notify import ChangeListener
from lectr.managers.orgs import OrgManager
from lectr.metrics import Registry
from lectr.providers import ProviderRegistry
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.orgs import OrgStore
from lectr.tracing import Tracing
from lectr.util.listen import ListenError, bind_ports
from lectr.util.poll import lean_dispatch
from lectr.util.service import CallbackService, ListeningPortService, ServiceStack
from lectr.vault.errors import VaultKeyError

_log = Logger()

#: new container objects between two young-generation collections, once
#: serving (see LectrService's start-up; CPython's default is 700)
GC_YOUNG_THRESHOLD = 10_000


class StartupError(Exception):
    """A start-up failure with a one-line explanation for the operator."""


# Failures whose message already explains the problem in one line.
_KNOWN_FAILURES = (
    StartupError,
    ConfigError,
    DatabaseUnavailable,
    EmbeddedDatabaseError,
    migrate.MigrationError,
    VaultKeyError,
)


@dataclass
class Components:
    """Everything the running process is made of (tests reach in here)."""

    config: Config
    metrics: Registry
    dsn: str = ""
    database: Database | None = None
    listener: ChangeListener | None = None
    providers: ProviderRegistry | None = None
    orgs: OrgManager | None = None
    # filled by the features as they start (see LectrService._start_*)
    settings: object | None = None  # provider settings manager
    vault: object | None = None  # provider-key vault manager
    pricing: object | None = None  # prices (lectr.pricing.manager.PricingManager)
    recorder: object | None = None  # usage recorder (UsageSink)
    usage: object | None = None  # request-log queries manager
    users: object | None = None  # admin identities and memberships
    authenticator: object | None = None  # Lectr-key cache (lectr.managers.auth)
    custom_providers: object | None = None  # custom provider rows (lectr.managers.custom_providers)
    routes: object | None = None  # org routes (lectr.managers.routes)
    health: object | None = None  # provider-key cool-downs (lectr.policy.health)
    limits: object | None = None  # limits and budgets (lectr.limits.LimitsManager)
    proxy: object | None = None  # the proxy handler (lectr.proxy.handler)
    tracing: Tracing | None = None  # OpenTelemetry export (lectr.tracing), maybe disabled
    proxy_port: ListeningPortService | None = None
    admin_port: ListeningPortService | None = None
    extras: dict = field(default_factory=dict)


class DatabaseService(Service):
    """Starts the embedded PostgreSQL when there is no DATABASE_URL, then
    opens the pool, retrying with backoff for ``db_connect_timeout`` seconds.
    Stops in reverse: pool (after in-flight queries), embedded server."""

    name = "database"

    def __init__(self, config: Config, *, reactor, metrics: Registry) -> None:
        self._config = config
        self._reactor = reactor
        self._metrics = metrics
        self._embedded: EmbeddedPostgres | None = None
        self.dsn: str | None = config.database_url
        self.database: Database | None = None

    def startService(self) -> Deferred:
        Service.startService(self)
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        if self.dsn is None:
            self._embedded = EmbeddedPostgres(self._config.data_dir / "pg", reactor=self._reactor)
            self.dsn = await self._embedded.start()
        self.database = Database(
            self.dsn,
            reactor=self._reactor,
            min_size=self._config.db_pool_min,
            max_size=self._config.db_pool_max,
            metrics=self._metrics,
        )
        deadline = self._reactor.seconds() + self._config.db_connect_timeout
        delay = 0.25
        while True:
            try:
                await self.database.start()
                return
            except DatabaseUnavailable as e:
                remaining = deadline - self._reactor.seconds()
                if remaining <= 0:
                    waited = self._config.db_connect_timeout
                    raise DatabaseUnavailable(
                        f"{e} (gave up after {waited:g}s; see LECTR_DB_CONNECT_TIMEOUT)"
                    ) from None
                pause = min(delay, remaining)
                _log.info(
                    "PostgreSQL is not reachable yet ({reason}); retrying in {delay:.2f}s",
                    reason=str(e),
                    delay=pause,
                )
                await deferLater(self._reactor, pause)
                delay = min(delay * 2, 5.0)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.database is not None:
            await self.database.close()
        if self._embedded is not None:
            await self._embedded.stop()


class LectrService(Service):
    """The service twistd runs. ``startService`` only schedules the real,
    asynchronous start-up for when the reactor runs (Tahoe-LAFS style);
    ``ready`` fires once both ports listen."""

    name = "lectr"

    def __init__(
        self,
        config: Config,
        *,
        reactor,
        exit_on_failure: bool = True,
        adopt: dict[str, tuple[int, int]] | None = None,
        sockets: dict[str, socket.socket] | None = None,
        freeze_gc: bool = True,
    ) -> None:
        self.config = config
        self._freeze_gc = freeze_gc  # off when embedded in a test process
        self._adopt = adopt or {}  # "proxy"/"admin" -> (fd, family) from a --workers parent
        self._sockets = dict(sockets or {})  # "proxy"/"admin" -> bound by lectr.tap
        self._reactor = reactor
        self._exit_on_failure = exit_on_failure
        self._stack = ServiceStack()
        self._starting: Deferred | None = None
        self._stopping: Deferred | None = None
        self.ready: Deferred[Components] = Deferred()
        self.components = Components(config=config, metrics=Registry())

    # --- twistd hooks ----------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._reactor.callWhenRunning(self._begin)

    def _begin(self) -> None:
        self._starting = ensureDeferred(self.start())
        self._starting.addErrback(self._failed)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        if self._stopping is None:
            self._stopping = ensureDeferred(self._stop())
        return self._stopping

    # --- start-up ----------------------------------------------------------------

    async def start(self) -> Components:
        c = self.components
        config = self.config
        # The ports first: "port in use" must not wait for the database.
        if not self._adopt and not self._sockets:
            try:
                self._sockets = bind_ports(config)
            except ListenError as e:
                raise StartupError(str(e)) from None
        if config.development_mode:
            _log.warn(
                "DEVELOPMENT MODE: embedded PostgreSQL and generated secrets in {data_dir}; "
                "set DATABASE_URL and ENCRYPTION_KEY for production",
                data_dir=str(config.data_dir),
            )

        await self._start_tracing(c)
        db_service = DatabaseService(config, reactor=self._reactor, metrics=c.metrics)
        await self._stack.start(db_service)
        c.database, c.dsn = db_service.database, db_service.dsn

        if config.no_migrate:
            await migrate.check_current(self._reactor, c.dsn)
        else:
            await migrate.upgrade(self._reactor, c.dsn)

        c.listener = ChangeListener(c.dsn, reactor=self._reactor, metrics=c.metrics)
        await self._stack.start(c.listener)

        # datastores → managers (one method per feature, in dependency order)
        c.providers = ProviderRegistry.from_config(config)
        c.orgs = OrgManager(OrgStore(c.database), ApiKeyStore(c.database))
        await self._start_catalogue(c)
        await self._start_vault(c)
        await self._start_routes(c)
        await self._start_usage(c)
        await self._start_limits(c)
        await self._start_proxy(c)

        # resources → ports
        c.proxy_port = ListeningPortService(
            "proxy",
            config.proxy_listen,
            self._proxy_site(c),
            reactor=self._reactor,
            before_stop=lambda: ensureDeferred(c.proxy.drain(config.shutdown_grace)),
            adopt=self._adoptable("proxy"),
        )
        c.admin_port = ListeningPortService(
            "admin API",
            config.admin_listen,
            self._admin_site(c),
            reactor=self._reactor,
            adopt=self._adoptable("admin"),
        )
        for port in (c.proxy_port, c.admin_port):
            try:
                await self._stack.start(port)
            except CannotListenError as e:
                reason = e.socketError.strerror if hasattr(e.socketError, "strerror") else e
                raise StartupError(
                    f"cannot listen on {port.description} ({port.name}): {reason}"
                ) from None
            except ValueError as e:
                raise StartupError(
                    f"invalid endpoint {port.description!r} for the {port.name}: {e}"
                ) from None
        # Everything allocated during start-up (modules, caches, Twisted)
        # lives as long as the process: move it out of the cyclic garbage
        # collector's sight, so that full collections only walk what requests
        # allocate. Measured with bench/run.py: p99 at concurrency 32 fell
        # from ~73 ms to ~17-31 ms, throughput rose 7-19 %. A finished request
        # leaves no cycle (tests/test_request_cycles.py): what the collector
        # would find is a closed connection's few objects, so it runs after
        # GC_YOUNG_THRESHOLD new container objects rather than CPython's 700
        # (which the in-flight requests and the usage buffer alone cross several
        # times a second: ~6 µs of each request's CPU at c=32, ~0 after).
        if self._freeze_gc:
            # (a process of its own: its reactor is Lectr's to tune)
            lean_dispatch(self._reactor)
            gc.collect()
            gc.freeze()
            _, older, oldest = gc.get_threshold()
            gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
        _log.info("Lectr is ready")
        if not self.ready.called:
            self.ready.callback(c)
        return c

    def _adoptable(self, name: str) -> tuple[int, int] | None:
        """(fd, family) of the socket bound for port ``name`` (handed over:
        the port service closes the descriptor once Twisted adopted it), or
        None to listen on the endpoint now (types not bound ahead)."""
        if name in self._adopt:
            return self._adopt[name]
        sock = self._sockets.pop(name, None)
        if sock is None:
            return None
        family = sock.family
        return sock.detach(), family

    # --- features ------------------------------------------------------------------

    async def _start_catalogue(self, c: Components) -> None:
        """Custom providers join the built-ins in the registry."""
        from lectr.managers.custom_providers import CustomProviderManager
        from lectr.storage.custom_providers import CustomProviderStore

        manager = CustomProviderManager(
            CustomProviderStore(c.database), c.providers, c.listener, self._reactor
        )
        await self._stack.start(
            CallbackService(
                "custom providers",
                start=lambda: ensureDeferred(manager.start()),
                stop=lambda: ensureDeferred(manager.stop()),
            )
        )
        c.custom_providers = manager
        _log.info(
            "provider base URLs: {urls}",
            urls=", ".join(f"{p.name} {p.base_url or '(per key)'}" for p in c.providers),
        )

    async def _start_routes(self, c: Components) -> None:
        """Org routes (virtual models) and provider-key cool-downs."""
        import time

        from lectr.managers.routes import RouteManager
        from lectr.policy.health import KeyHealth
        from lectr.storage.routes import RouteStore

        routes = RouteManager(RouteStore(c.database), c.providers, c.listener, self._reactor)
        await self._stack.start(
            CallbackService(
                "routes",
                start=lambda: ensureDeferred(routes.start()),
                stop=lambda: ensureDeferred(routes.stop()),
            )
        )
        c.routes = routes
        c.health = KeyHealth(self._reactor, wall_clock=time.time, metrics=c.metrics)

    async def _start_tracing(self, c: Components) -> None:
        """OpenTelemetry traces (OTEL_* variables). Started first so that it
        stops last: the spans of the requests drained at shutdown go out."""
        try:
            c.tracing = Tracing.from_environ(
                os.environ,
                reactor=self._reactor,
                metrics=c.metrics,
                propagation=self.config.trace_propagation,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        tracing = c.tracing
        await self._stack.start(
            CallbackService(
                "tracing", start=tracing.start, stop=lambda: ensureDeferred(tracing.stop())
            )
        )

    async def _start_vault(self, c: Components) -> None:
        """Provider keys (BYOK vault), master-key rotation, provider settings."""
        from lectr.managers.provider_settings import ProviderSettingsManager
        from lectr.managers.vault import VaultManager
        from lectr.providers.http import make_http_request
        from lectr.storage.provider_keys import ProviderKeyStore
        from lectr.storage.provider_settings import ProviderSettingsStore

        config = self.config
        if config.encryption_key is None:
            raise StartupError("ENCRYPTION_KEY is not set: it is the master key of the vault")
        settings = ProviderSettingsManager(
            ProviderSettingsStore(c.database), c.providers, c.listener, self._reactor
        )
        await self._stack.start(
            CallbackService(
                "provider settings",
                start=lambda: ensureDeferred(settings.start()),
                stop=lambda: ensureDeferred(settings.stop()),
            )
        )
        c.settings = settings
        vault = VaultManager(
            ProviderKeyStore(c.database),
            c.providers,
            kek=config.encryption_key,
            kek_new=config.encryption_key_new,
            http_request=make_http_request(self._reactor),
            listener=c.listener,
            reactor=self._reactor,
            metrics=c.metrics,
            key_base_url_hosts=config.key_base_url_hosts,
        )
        await self._stack.start(
            CallbackService(
                "vault",
                start=lambda: ensureDeferred(vault.start()),
                stop=lambda: ensureDeferred(vault.stop()),
            )
        )
        c.vault = vault

    async def _start_usage(self, c: Components) -> None:
        """Prices; usage recorder and flusher; request-log queries."""
        from lectr.managers.usage import UsageManager
        from lectr.pricing.manager import PricingManager
        from lectr.storage.pricing import PricingStore
        from lectr.storage.request_logs import RequestLogStore
        from lectr.usage.recorder import UsageRecorder

        pricing = PricingManager(
            PricingStore(c.database),
            reactor=self._reactor,
            metrics=c.metrics,
            listener=c.listener,
        )
        await self._stack.start(
            CallbackService(
                "prices",
                start=lambda: ensureDeferred(pricing.start()),
                stop=lambda: ensureDeferred(pricing.stop()),
            )
        )
        c.pricing = pricing
        store = RequestLogStore(c.database)
        recorder = UsageRecorder(
            store,
            reactor=self._reactor,
            data_dir=self.config.data_dir,
            metrics=c.metrics,
            spill_max_bytes=self.config.spill_max_bytes,
            pricing=pricing,
        )
        # Registered before the ports (which start later): the stack stops in
        # reverse, so the final flush runs after the proxy has drained and
        # before the pool closes. Rows left in the spill journal by an earlier
        # run are replayed once PostgreSQL takes writes.
        await self._stack.start(
            CallbackService(
                "usage recorder",
                start=lambda: ensureDeferred(recorder.start()),
                stop=lambda: ensureDeferred(recorder.stop()),
            )
        )
        c.recorder = recorder
        c.usage = UsageManager(store)
        from lectr.usage.retention import RequestLogMaintenance

        # partitions made ahead of time; retention drops the expired ones
        maintenance = RequestLogMaintenance(
            store,
            days=self.config.request_log_retention_days,
            reactor=self._reactor,
            metrics=c.metrics,
        )
        await self._stack.start(
            CallbackService(
                "request log partitions", start=maintenance.start, stop=maintenance.stop
            )
        )

    async def _start_limits(self, c: Components) -> None:
        """Limits and budgets (docs/limits.md): the caps cached in memory,
        lease rounds with PostgreSQL in the background, budget alerts.
        Started before the proxy port and so stopped after it has drained:
        the unused leases are handed back at the end."""
        from lectr.limits import LimitsManager
        from lectr.storage.limits import LimitStore

        config = self.config
        webhook = None
        if config.alert_webhook_url is not None:
            from lectr.limits.alerts import AlertWebhook, describe_url

            webhook = AlertWebhook(
                config.alert_webhook_url,
                config.alert_webhook_secret,
                reactor=self._reactor,
                metrics=c.metrics,
            )
            _log.info("budget alerts go to {url}", url=describe_url(config.alert_webhook_url))
        limits = LimitsManager(
            LimitStore(c.database),
            reactor=self._reactor,
            listener=c.listener,
            metrics=c.metrics,
            fail_closed=config.limits_fail_closed,
            lease_fraction=config.limits_lease_fraction,
            webhook=webhook,
        )
        await self._stack.start(
            CallbackService(
                "limits",
                start=lambda: ensureDeferred(limits.start()),
                stop=lambda: ensureDeferred(limits.stop()),
            )
        )
        c.limits = limits

    async def _start_proxy(self, c: Components) -> None:
        """Authenticator (key cache), the upstream client, the policy chain,
        the handler."""
        from lectr.http.client import Origin, UpstreamClient
        from lectr.managers.auth import Authenticator
        from lectr.policy.keys import KeyAvailability
        from lectr.policy.limits import Limits
        from lectr.policy.org import OrgEnabled
        from lectr.policy.plan import Selector
        from lectr.policy.providers import ProviderPolicy
        from lectr.policy.route import ResolveRoute
        from lectr.proxy.handler import ProxyHandler
        from lectr.proxy.headers import HeaderPolicy
        from lectr.proxy.judge import BodyJudge

        config = self.config
        auth = Authenticator(ApiKeyStore(c.database), reactor=self._reactor, metrics=c.metrics)
        auth.subscribe(c.listener)
        await self._stack.start(CallbackService("key cache", start=auth.start, stop=auth.stop))
        c.authenticator = auth

        client = UpstreamClient(
            self._reactor, connect_timeout=config.upstream_connect_timeout, metrics=c.metrics
        )
        await self._stack.start(CallbackService("upstream connections", stop=client.close_idle))
        # Large request bodies are read in a process of their own (stopped
        # after the proxy port has drained: registered before it)
        judge = BodyJudge(reactor=self._reactor, metrics=c.metrics)
        await self._stack.start(CallbackService("body judge", start=judge.start, stop=judge.stop))
        selector = Selector(c.vault, c.health, c.providers)
        # The policy chain, in order (docs/architecture.md, "The policy chain").
        steps = [
            OrgEnabled(),
            ResolveRoute(c.routes, c.providers),
            ProviderPolicy(c.settings, c.providers),
            KeyAvailability(selector),
            Limits(c.limits, dearest=c.pricing.dearest_micro),
        ]
        c.proxy = ProxyHandler(
            reactor=self._reactor,
            registry=c.providers,
            authenticator=auth,
            vault=c.vault,
            selector=selector,
            health=c.health,
            steps=steps,
            header_policy=HeaderPolicy(
                c.providers,
                forward=frozenset(h.encode() for h in config.forward_headers),
                trace_propagation=c.tracing.propagation if c.tracing.enabled else None,
            ),
            client=client,
            recorder=c.recorder,
            metrics=c.metrics,
            headers_timeout=config.upstream_headers_timeout,
            idle_timeout=config.upstream_idle_timeout,
            origin_factory=Origin.from_url,
            price=c.pricing.price,
            tracing=c.tracing,
            judge=judge,
        )

    def _proxy_site(self, c: Components):
        from lectr.http.server import ProxyServerFactory

        return ProxyServerFactory(
            c.proxy,
            reactor=self._reactor,
            max_body_bytes=self.config.max_body_bytes,
            body_timeout=self.config.body_read_timeout,
            header_timeout=30.0,
            keepalive_timeout=300.0,
            max_unadmitted=self.config.max_unauthenticated,
            metrics=c.metrics,
        )

    def _admin_site(self, c: Components) -> Site:
        """The admin API: identities and memberships (``c.users``), the
        authenticator (admin token, OIDC JWTs) and the Klein app."""
        from lectr.admin.wiring import build_admin

        admin = build_admin(c, self.config, reactor=self._reactor)
        c.users = admin.users
        c.extras["admin"] = admin
        admin.start()  # in the background: the issuer may be down
        self.add_stop_hook("OIDC fetchers", admin.stop)
        return admin.site

    def add_stop_hook(self, name: str, stop) -> Deferred:
        """Register something to stop (in reverse order) at shutdown."""
        return ensureDeferred(self._stack.start(CallbackService(name, stop=stop)))

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        for sock in self._sockets.values():  # bound, never adopted (start-up failed)
            sock.close()
        self._sockets.clear()
        await self._stack.stop_all()

    # --- failure -----------------------------------------------------------------

    def _failed(self, failure) -> None:
        if failure.check(CancelledError) and not self.running:
            # SIGTERM while starting: stopService cancelled the start-up. A
            # stop that was asked for, not a start-up failure.
            _log.info("start-up interrupted: Lectr is stopping")
            fail_ready(self.ready, failure)
            return
        if failure.check(*_KNOWN_FAILURES):
            message = str(failure.value)
        else:
            _log.failure("unexpected error during start-up", failure)
            message = (
                f"unexpected error during start-up: {type(failure.value).__name__}: "
                f"{failure.value} (traceback in the log)"
            )
        _log.critical("start-up failed: {message}", message=message)
        fail_ready(self.ready, failure)
        if not self._exit_on_failure:
            return
        tell_operator(message)
        d = self.stopService()
        d.addBoth(lambda _: _exit_after_reactor(self._reactor, 1))


def fail_ready(ready: Deferred, failure) -> None:
    """Fire a service's ``ready`` with its start-up's failure, once, marked
    handled: the service reports the failure itself (log, terminal)."""
    if not ready.called:
        ready.errback(failure)
        ready.addErrback(lambda _: None)


def tell_operator(message: str) -> None:
    """A start-up failure on the operator's terminal (twistd points
    sys.stderr at the log; the terminal is the original)."""
    stderr = sys.__stderr__ or sys.stderr
    stderr.write(f"lectr: start-up failed: {message}\n")
    stderr.flush()


def stop_reactor(reactor) -> bool:
    """``reactor.stop()``, unless it is stopping already (a signal came
    first, or a second one): whether this call stopped it."""
    try:
        stopped = reactor.stop()
    except ReactorNotRunning:
        return False
    return stopped is not False  # (False from stop_at_most_once's stop)


def stop_at_most_once(reactor) -> None:
    """Make a second request to stop harmless. A process often gets two: an
    operator's SIGTERM after a SIGHUP or another SIGTERM while requests
    drain; a Ctrl-C (SIGINT) or systemd's stop (SIGTERM to every process of
    the service) reaching a worker directly before its supervisor passes
    SIGTERM on. Twisted's signal handlers call ``reactor.stop``, which raised
    ReactorNotRunning on the second, logged as a critical error with a
    traceback. (Lectr's own process, twistd's or a worker's: a test's
    reactor is left alone.)"""
    stop = reactor.stop

    def stop_once() -> bool:
        try:
            stop()
        except ReactorNotRunning:
            return False  # stopping already
        return True

    reactor.stop = stop_once


def stop_on_hangup(reactor) -> None:
    """SIGHUP (the terminal closed, or ``kill -HUP``) stops Lectr in order, as
    SIGTERM does: by default it killed the process at once, cutting the
    requests in flight and losing the usage rows not yet written. Left alone
    when SIGHUP is ignored (``nohup``)."""
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        return

    def stop() -> None:
        if stop_reactor(reactor):
            _log.info("Received SIGHUP, shutting down.")

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(stop))


def _exit_after_reactor(reactor, code: int) -> None:
    """Stop the reactor, let twistd clean up (pidfile, logs), then exit with
    ``code``: twistd itself always exits 0 after a normal reactor stop."""

    def force_exit() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        os._exit(code)

    atexit.register(force_exit)
    if reactor.running:
        stop_reactor(reactor)
