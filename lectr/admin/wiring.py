"""Building the admin API from the running components (called by
``LectrService._admin_site``): identities and memberships, the
authenticator (admin token, OIDC JWTs with a JWKS cache), the Klein app and
its Site."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger

from lectr.admin.app import AdminApp
from lectr.admin.auth import AdminAuthenticator, JWKSCache, JWTVerifier, treq_http_get
from lectr.admin.site import AdminSite
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


def _usage_manager(c):
    """The request-log queries hold no state: when the usage feature has not
    made one, the admin API makes its own."""
    from lectr.managers.usage import UsageManager
    from lectr.storage.request_logs import RequestLogStore

    return UsageManager(RequestLogStore(c.database))


def build_admin(c, config: Config, *, reactor, http_get=None) -> AdminParts:
    """``c`` is the service's Components (database, metrics, orgs, vault,
    settings, usage)."""
    users = UserManager(UserStore(c.database), MemberStore(c.database))
    jwks = verifier = None
    oidc = config.oidc
    if oidc is not None:
        jwks = JWKSCache(oidc.jwks_url, http_get=http_get or treq_http_get(reactor), clock=reactor)
        verifier = JWTVerifier(issuer=oidc.issuer, audience=oidc.audience, jwks=jwks)
        _log.info(
            "admin API accepts OIDC tokens from {issuer} for {audience}",
            issuer=oidc.issuer,
            audience=oidc.audience,
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
        tracing=getattr(c, "tracing", None),
    )
    return AdminParts(app, AdminSite(app.resource()), users, authenticator, jwks)
