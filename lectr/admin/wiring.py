"""Building the admin API from the running components (called by
``LectrService._admin_site``): identities and memberships, the
authenticator (admin token, OIDC JWTs with a JWKS cache), the dashboard's
sign-in options (OIDC discovery), the Klein app, the dashboard and their
Site."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger

from lectr.admin.app import AdminApp
from lectr.admin.auth import AdminAuthenticator, JWKSCache, JWTVerifier, treq_http_get
from lectr.admin.signin import OIDCDiscovery, SignInOptions
from lectr.admin.site import AdminRoot, AdminSite
from lectr.config import Config
from lectr.managers.users import UserManager
from lectr.storage.members import MemberStore
from lectr.storage.users import UserStore

_log = Logger()


@dataclass
class AdminParts:
    app: AdminApp
    site: AdminSite
    users: UserManager
    authenticator: AdminAuthenticator
    jwks: JWKSCache | None
    discovery: OIDCDiscovery | None = None

    def start(self) -> None:
        """Fetch the issuer's keys and endpoints in the background (the
        issuer may be down: start-up never waits for it)."""
        for fetcher in (self.jwks, self.discovery):
            if fetcher is not None:
                fetcher.start()

    def stop(self) -> None:
        for fetcher in (self.jwks, self.discovery):
            if fetcher is not None:
                fetcher.stop()


def _usage_manager(c):
    """The request-log queries hold no state: when the usage feature has not
    made one, the admin API makes its own."""
    from lectr.managers.usage import UsageManager
    from lectr.storage.request_logs import RequestLogStore

    return UsageManager(RequestLogStore(c.database))


def _explainer(c):
    """Route explanations run the proxy's own policy chain."""
    if c.proxy is None:
        return None
    from lectr.managers.explain import RouteExplainer

    return RouteExplainer(
        orgs=c.orgs,
        registry=c.providers,
        steps=c.proxy.steps,
        vault=c.vault,
        health=c.health,
        selector=c.proxy.selector,
    )


def build_admin(c, config: Config, *, reactor, http_get=None) -> AdminParts:
    """``c`` is the service's Components (database, metrics, orgs, vault,
    settings, usage, limits)."""
    from lectr.dashboard.assets import Assets
    from lectr.dashboard.resource import DashboardResource

    users = UserManager(UserStore(c.database), MemberStore(c.database))
    jwks = verifier = discovery = None
    oidc = config.oidc
    if oidc is not None:
        http_get = http_get or treq_http_get(reactor)
        jwks = JWKSCache(oidc.jwks_url, http_get=http_get, clock=reactor)
        verifier = JWTVerifier(issuer=oidc.issuer, audience=oidc.audience, jwks=jwks)
        _log.info(
            "admin API accepts OIDC tokens from {issuer} for {audience}",
            issuer=oidc.issuer,
            audience=oidc.audience,
        )
        if oidc.client_id:
            discovery = OIDCDiscovery(oidc.issuer, http_get=http_get, clock=reactor)
        else:
            _log.info("the dashboard offers no OIDC sign-in: LECTR_OIDC_CLIENT_ID is not set")
    sign_in = SignInOptions(
        admin_token=config.admin_token is not None,
        oidc=oidc,
        discovery=discovery,
        reactor=reactor,
    )
    if config.admin_token is None and verifier is None:
        _log.warn(
            "admin API: neither LECTR_ADMIN_TOKEN nor OIDC is configured; "
            "only /healthz, /readyz, /metrics and /admin/openapi.json will answer"
        )
    authenticator = AdminAuthenticator(
        users=users, admin_token=config.admin_token, verifier=verifier
    )
    app = AdminApp(
        reactor=reactor,
        database=c.database,
        metrics=c.metrics,
        users=users,
        authenticator=authenticator,
        orgs=c.orgs,
        vault=c.vault,
        settings=c.settings,
        usage=c.usage if c.usage is not None else _usage_manager(c),
        registry=c.providers,
        routes=c.routes,
        custom_providers=c.custom_providers,
        health=c.health,
        explainer=_explainer(c),
        limits=getattr(c, "limits", None),  # (absent from partial component sets)
        sign_in=sign_in,
        pricing=getattr(c, "pricing", None),
        tracing=getattr(c, "tracing", None),
    )
    dashboard = DashboardResource(Assets.load(), sign_in)
    site = AdminSite(AdminRoot(app.resource(), dashboard))
    return AdminParts(app, site, users, authenticator, jwks, discovery)
