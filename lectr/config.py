"""Lectr's settings: one table that drives ``twistd lectr --help``, the
environment variables, validation and the configuration reference.

Every setting has an environment variable; those that have a command-line
option too take the option first. Secrets come only from the environment.
A bad value raises :class:`ConfigError` with a message that names the setting
and never contains a secret value.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lectr.util.secret import Secret


class ConfigError(Exception):
    """A setting is missing or malformed. The message is shown to the operator
    as one line, so it names the setting and the fix, never the secret."""


# --- parsers -----------------------------------------------------------------


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"expected a whole number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected a number from {lo} to {hi}, got {value}")
        return value

    return parse


def _seconds(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected {lo:g} to {hi:g} seconds, got {value:g}")
        return value

    return parse


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1/0, true/false or yes/no, got {raw!r}")


MAX_WORKERS = 256
CGROUP = Path("/sys/fs/cgroup")


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may run on: its CPU affinity (a cpuset, e.g.
    ``docker run --cpuset-cpus``), bounded by a CPU quota (``docker run
    --cpus``, a Kubernetes limit: cgroup v2 ``cpu.max``, or v1's
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us``) rounded up. ``os.cpu_count()``
    is the host's, which in a container with a 2-CPU limit on a 64-core host
    would start 64 processes taking turns on 2 CPUs' worth of time."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def _cgroup_quota(cgroup: Path) -> int | None:
    """The CPU quota in whole cores (rounded up), or None for none: cgroup
    v2's ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD"), else v1's
    ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us``."""
    fields = _read_fields(cgroup / "cpu.max")
    if fields is None:
        v1 = cgroup / "cpu"
        quota = _read_fields(v1 / "cpu.cfs_quota_us")
        period = _read_fields(v1 / "cpu.cfs_period_us")
        if quota is None or period is None:
            return None
        fields = quota + period
    try:
        quota, period = int(fields[0]), int(fields[1])
    except (ValueError, IndexError):
        return None  # "max" (v2) or an unreadable file: no quota
    if quota <= 0 or period <= 0:
        return None  # -1 (v1): no quota
    return -(-quota // period)


def _read_fields(path: Path) -> list[str] | None:
    try:
        return path.read_text().split()
    except (OSError, UnicodeDecodeError):
        return None


def _workers(raw: str) -> int:
    value = raw.strip().lower()
    if value == "auto":
        return min(usable_cores(), MAX_WORKERS)
    try:
        return _int_in(1, MAX_WORKERS)(value)
    except ValueError as e:
        raise ValueError(f"{e} (or auto: one per usable core)") from None


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _http_base_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s):// URL, got {raw!r}")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query string or fragment")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials")
    return value


_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEVER_FORWARDED = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "host"}
)


def _header_names(raw: str) -> frozenset[str]:
    names = frozenset(n.strip().lower() for n in raw.split(",") if n.strip())
    for name in names:
        if not _HEADER_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a header name")
        if name in _NEVER_FORWARDED:
            raise ValueError(f"{name!r} carries credentials and is never forwarded")
    return names


def _host_patterns(raw: str) -> tuple[str, ...]:
    patterns = tuple(p.strip().lower() for p in raw.split(",") if p.strip())
    for p in patterns:
        if not re.fullmatch(r"[a-z0-9*.\-:\[\]]+", p):
            raise ValueError(f"{p!r} is not a host pattern")
    return patterns


def _provider_base_url(raw: str) -> str:
    """A provider origin, optionally with a path prefix, never ending in
    ``/v1``: Lectr appends the client's ``/v1/…`` path itself, so such a URL
    would send every call to ``/v1/v1/…`` and get 404 from the provider."""
    value = _http_base_url(raw)
    path = urlsplit(value).path
    if path.rsplit("/", 1)[-1].lower() == "v1":
        fixed = value[: len(value) - len(path)] + path[: path.rfind("/")]
        raise ValueError(
            f"{value!r} ends in /v1, which Lectr adds itself (clients call …/v1/…): "
            f"set it to {fixed!r}"
        )
    return value


def _fraction(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"expected a number above 0 and at most 1, got {value:g}")
    return value


def _webhook_url(raw: str) -> str:
    """An http(s) URL to POST to; it may carry a path and a query string
    (never shown in logs), not credentials."""
    value = raw.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http(s):// URL")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (put a token in the query string)")
    if parts.fragment:
        raise ValueError("must not carry a fragment")
    return value


def parse_database_url(raw: str) -> str:
    """Validate a ``postgresql://`` URL and return it in the form libpq
    accepts. Unix-socket hosts (``?host=/run/postgresql`` or a percent-encoded
    host) and parameters such as ``sslmode`` are kept as they are."""
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import parse_dsn

    value = raw.strip()
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ValueError("expected a URL of the form postgresql://user:password@host:port/database")
    try:
        params = parse_dsn(value)
    except ProgrammingError as e:
        # libpq's message never echoes the password back
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "unparseable"
        raise ValueError(f"not a valid PostgreSQL URL ({detail})") from None
    for port in params.get("port", "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"the port must be a number from 1 to 65535, got {port!r}")
    return value


def redact_url(url: str) -> str:
    """The URL with any password replaced, for log lines and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def parse_master_key(raw: str) -> Secret[bytes]:
    """A master key (KEK): 32 bytes, standard or URL-safe base64."""
    value = raw.strip()
    try:
        padded = value + "=" * (-len(value) % 4)
        # (the URL-safe alphabet read as the standard one, so that both are
        # validated: a stray character is an error, never silently dropped)
        decoded = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "not valid base64; generate one with: python3 -c "
            "'import os,base64;print(base64.b64encode(os.urandom(32)).decode())'"
        ) from None
    if len(decoded) != 32:
        raise ValueError(f"must decode to 32 bytes, got {len(decoded)} bytes")
    return Secret(decoded)


def parse_token(raw: str) -> Secret[str]:
    """A static admin token (LECTR_ADMIN_TOKEN, or development mode's file):
    16 characters or more, no whitespace or control character inside."""
    value = raw.strip()
    if len(value) < 16:
        raise ValueError("must be at least 16 characters long")
    if any(c.isspace() or ord(c) < 0x20 for c in value):
        raise ValueError("must not contain whitespace or control characters")
    return Secret(value)


# --- the table ---------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    attr: str
    env: str
    default: str | None
    help: str
    parse: Callable[[str], Any] = str
    option: str | None = None  # long command-line option, if any
    flag: bool = False  # a command-line flag rather than a parameter
    secret: bool = False  # environment only, never shown


#: the attribute prefix of the per-provider base URL settings
BASE_URL_ATTR = "base_url:"


def _provider_base_url_settings() -> list[Setting]:
    """``LECTR_<PROVIDER>_BASE_URL`` for every built-in provider (the
    catalogue decides which exist; see lectr/providers/catalogue)."""
    from lectr.providers.registry import discover

    out = []
    for cls in discover():
        if cls.default_base_url is None:
            meaning = f"{cls.display_name} base URL used by keys that name none"
        else:
            meaning = f"{cls.display_name} base URL; may carry a path prefix"
        out.append(
            Setting(
                BASE_URL_ATTR + cls.name,
                f"LECTR_{cls.name.upper().replace('-', '_')}_BASE_URL",
                cls.default_base_url,
                meaning,
                _provider_base_url,
            )
        )
    return out


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "proxy_listen",
        "LECTR_PROXY_LISTEN",
        "tcp:8080",
        "Twisted endpoint string of the proxy port",
        _nonempty,
        option="proxy-listen",
    ),
    Setting(
        "admin_listen",
        "LECTR_ADMIN_LISTEN",
        "tcp:8081:interface=127.0.0.1",
        "Endpoint of the admin API",
        _nonempty,
        option="admin-listen",
    ),
    Setting(
        "database_url",
        "DATABASE_URL",
        None,
        "postgresql://user:pass@host:port/db; unset: an embedded PostgreSQL in <data-dir>/pg",
        parse_database_url,
        option="database-url",
    ),
    Setting(
        "data_dir",
        "LECTR_DATA_DIR",
        "./.lectr",
        "Embedded database, usage-log spill journal, generated development secrets",
        lambda raw: Path(_nonempty(raw)).expanduser().absolute(),
        option="data-dir",
    ),
    Setting(
        "workers",
        "LECTR_WORKERS",
        "1",
        "Processes sharing the proxy socket, or 'auto' for one per usable core",
        _workers,
        option="workers",
    ),
    Setting(
        "no_migrate",
        "LECTR_NO_MIGRATE",
        "0",
        "Do not run database migrations at start-up",
        parse_bool,
        option="no-migrate",
        flag=True,
    ),
    Setting(
        "db_pool_min",
        "LECTR_DB_POOL_MIN",
        "2",
        "PostgreSQL connections opened at start-up",
        _int_in(1, 200),
        option="db-pool-min",
    ),
    Setting(
        "db_pool_max",
        "LECTR_DB_POOL_MAX",
        "10",
        "Most PostgreSQL connections the pool opens",
        _int_in(1, 500),
        option="db-pool-max",
    ),
    Setting(
        "db_connect_timeout",
        "LECTR_DB_CONNECT_TIMEOUT",
        "30",
        "Seconds to keep retrying PostgreSQL at start-up before giving up",
        _seconds(0, 3600),
    ),
    Setting(
        "encryption_key",
        "ENCRYPTION_KEY",
        None,
        "Master key (KEK) wrapping provider keys: 32 bytes, base64. Required with DATABASE_URL",
        parse_master_key,
        secret=True,
    ),
    Setting(
        "encryption_key_new",
        "ENCRYPTION_KEY_NEW",
        None,
        "Next master key; while set, new writes use it and stored keys are rewrapped to it",
        parse_master_key,
        secret=True,
    ),
    Setting(
        "admin_token",
        "LECTR_ADMIN_TOKEN",
        None,
        "Static bearer token with global-admin rights on the admin API (automation, CLI)",
        parse_token,
        secret=True,
    ),
    Setting(
        "auth0_domain",
        "AUTH0_DOMAIN",
        None,
        "Auth0 tenant domain (shortcut for the LECTR_OIDC_* settings)",
        _nonempty,
    ),
    Setting("auth0_audience", "AUTH0_AUDIENCE", None, "Auth0 API audience", _nonempty),
    Setting("oidc_issuer", "LECTR_OIDC_ISSUER", None, "OIDC issuer (iss) of admin JWTs", _nonempty),
    Setting(
        "oidc_audience",
        "LECTR_OIDC_AUDIENCE",
        None,
        "Expected audience (aud) of admin JWTs",
        _nonempty,
    ),
    Setting(
        "oidc_jwks_url",
        "LECTR_OIDC_JWKS_URL",
        None,
        "JWKS URL of the issuer; default <issuer>/.well-known/jwks.json",
        _http_base_url,
    ),
    Setting(
        "oidc_client_id",
        "LECTR_OIDC_CLIENT_ID",
        None,
        "OIDC client id of the dashboard (a public client: authorization code + PKCE)",
        _nonempty,
    ),
    *_provider_base_url_settings(),
    Setting(
        "max_body_bytes",
        "LECTR_MAX_BODY_BYTES",
        "33554432",
        "Largest request body accepted; larger ones get 413",
        _int_in(1, 2**40),
    ),
    Setting(
        "body_read_timeout",
        "LECTR_BODY_READ_TIMEOUT",
        "60",
        "Seconds a client may take to send a whole request body (408 when exceeded)",
        _seconds(1, 3600),
    ),
    Setting(
        "max_unauthenticated",
        "LECTR_MAX_UNAUTHENTICATED",
        "1024",
        "Connections per process that may wait without a checked key; more are closed",
        _int_in(1, 1_000_000),
    ),
    Setting(
        "forward_headers",
        "LECTR_FORWARD_HEADERS",
        "",
        "Client-identifying headers to pass to providers (comma-separated, e.g. "
        "x-forwarded-for); credentials are never passed",
        _header_names,
    ),
    Setting(
        "key_base_url_hosts",
        "LECTR_KEY_BASE_URL_HOSTS",
        "",
        "More host patterns (comma-separated, * wildcards) a provider key's own base_url may "
        "name, for providers whose keys carry one (Azure)",
        _host_patterns,
    ),
    Setting(
        "upstream_connect_timeout",
        "LECTR_UPSTREAM_CONNECT_TIMEOUT",
        "10",
        "Seconds to connect to a provider (504 when exceeded)",
        _seconds(0.1, 600),
    ),
    Setting(
        "upstream_headers_timeout",
        "LECTR_UPSTREAM_HEADERS_TIMEOUT",
        "600",
        "Seconds to wait for a provider's response headers (504 when exceeded)",
        _seconds(0.1, 86400),
    ),
    Setting(
        "upstream_idle_timeout",
        "LECTR_UPSTREAM_IDLE_TIMEOUT",
        "300",
        "Seconds a provider may stay silent mid-body before the stream is aborted",
        _seconds(0.1, 86400),
    ),
    Setting(
        "trace_propagation",
        "LECTR_TRACE_PROPAGATION",
        "lectr",
        "With tracing on: the traceparent providers receive (lectr, client or none)",
        _one_of("lectr", "client", "none"),
    ),
    Setting(
        "spill_max_bytes",
        "LECTR_SPILL_MAX_BYTES",
        "1073741824",
        "Disk budget of the usage-log spill journal while PostgreSQL is unreachable",
        _int_in(0, 2**50),
    ),
    Setting(
        "request_log_retention_days",
        "LECTR_REQUEST_LOG_RETENTION_DAYS",
        "0",
        "Delete request-log rows older than this many days (0 keeps them forever)",
        _int_in(0, 36500),
    ),
    Setting(
        "limits_fail_closed",
        "LECTR_LIMITS_FAIL_CLOSED",
        "0",
        "While PostgreSQL is unreachable, refuse requests under limits (503) once the "
        "leases held run out, instead of enforcing each node's share locally",
        parse_bool,
    ),
    Setting(
        "limits_lease_fraction",
        "LECTR_LIMITS_LEASE_FRACTION",
        "0.05",
        "Share of a cap a node draws from PostgreSQL at a time; the overshoot bound is "
        "nodes x lease",
        _fraction,
    ),
    Setting(
        "alert_webhook_url",
        "LECTR_ALERT_WEBHOOK_URL",
        None,
        "URL that budget alerts (80 % and 100 % of a budget) are POSTed to, signed",
        _webhook_url,
    ),
    Setting(
        "alert_webhook_secret",
        "LECTR_ALERT_WEBHOOK_SECRET",
        None,
        "Key of the HMAC-SHA256 signature (x-lectr-signature) of budget alerts",
        parse_token,
        secret=True,
    ),
    Setting(
        "shutdown_grace",
        "LECTR_SHUTDOWN_GRACE",
        "30",
        "Seconds in-flight requests may take to finish on shutdown",
        _seconds(0, 3600),
    ),
)

SETTINGS_BY_ATTR = {s.attr: s for s in SETTINGS}


@dataclass(frozen=True)
class OIDCConfig:
    issuer: str
    audience: str
    jwks_url: str
    client_id: str | None = None  # the dashboard signs in only with one


@dataclass(frozen=True)
class Config:
    proxy_listen: str = "tcp:8080"
    admin_listen: str = "tcp:8081:interface=127.0.0.1"
    database_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path(".lectr").absolute())
    workers: int = 1
    no_migrate: bool = False
    db_pool_min: int = 2
    db_pool_max: int = 10
    db_connect_timeout: float = 30.0
    encryption_key: Secret[bytes] | None = None
    encryption_key_new: Secret[bytes] | None = None
    admin_token: Secret[str] | None = None
    auth0_domain: str | None = None
    auth0_audience: str | None = None
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    #: provider name -> base URL (LECTR_<PROVIDER>_BASE_URL or the default)
    provider_base_urls: Mapping[str, str] = field(default_factory=dict)
    oidc_client_id: str | None = None
    max_body_bytes: int = 33554432
    body_read_timeout: float = 60.0
    max_unauthenticated: int = 1024
    forward_headers: frozenset[str] = frozenset()
    key_base_url_hosts: tuple[str, ...] = ()
    upstream_connect_timeout: float = 10.0
    upstream_headers_timeout: float = 600.0
    upstream_idle_timeout: float = 300.0
    trace_propagation: str = "lectr"
    spill_max_bytes: int = 1073741824
    request_log_retention_days: int = 0
    limits_fail_closed: bool = False
    limits_lease_fraction: float = 0.05
    alert_webhook_url: str | None = None
    alert_webhook_secret: Secret[str] | None = None
    shutdown_grace: float = 30.0
    # Filled in by the start-up code, not by the operator.
    development_mode: bool = False

    @property
    def openai_base_url(self) -> str | None:
        return self.provider_base_urls.get("openai")

    @property
    def anthropic_base_url(self) -> str | None:
        return self.provider_base_urls.get("anthropic")

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def oidc(self) -> OIDCConfig | None:
        if self.oidc_issuer:
            issuer = self.oidc_issuer
            audience = self.oidc_audience or self.auth0_audience
            jwks = self.oidc_jwks_url or issuer.rstrip("/") + "/.well-known/jwks.json"
        elif self.auth0_domain:
            domain = self.auth0_domain.removeprefix("https://").strip("/")
            issuer = f"https://{domain}/"
            audience = self.oidc_audience or self.auth0_audience
            jwks = self.oidc_jwks_url or f"https://{domain}/.well-known/jwks.json"
        else:
            return None
        if not audience:
            return None
        return OIDCConfig(
            issuer=issuer, audience=audience, jwks_url=jwks, client_id=self.oidc_client_id
        )


def load_config(cli: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Merge command-line values (``cli``: attr → raw string, or None when the
    option was not given) over the environment over the defaults."""
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = cli.get(s.attr) if s.option else None
        source = f"--{s.option}" if raw is not None else None
        if raw is None:
            env_value = environ.get(s.env)
            if env_value is not None and (env_value.strip() or s.flag):
                raw, source = env_value, s.env
        if raw is None:
            if s.default is None:
                continue
            raw, source = s.default, f"default of {s.env}"
        if s.flag and isinstance(raw, bool):
            values[s.attr] = raw
            continue
        try:
            value = s.parse(str(raw))
        except ValueError as e:
            raise ConfigError(f"{source} is malformed: {e}") from None
        if s.attr.startswith(BASE_URL_ATTR):
            values.setdefault("provider_base_urls", {})[s.attr[len(BASE_URL_ATTR) :]] = value
        else:
            values[s.attr] = value
    config = Config(**values)
    _check(config, environ)
    # the standard OTEL_* variables are settings too: refused here, before
    # anything is bound or made (lectr.service builds the tracer from them)
    from lectr.tracing import trace_settings

    try:
        trace_settings(environ)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config


def _check(config: Config, environ: Mapping[str, str]) -> None:
    if config.db_pool_min > config.db_pool_max:
        raise ConfigError(
            f"LECTR_DB_POOL_MIN ({config.db_pool_min}) is larger than "
            f"LECTR_DB_POOL_MAX ({config.db_pool_max})"
        )
    if config.database_url is not None and config.encryption_key is None:
        raise ConfigError(
            "ENCRYPTION_KEY is required when DATABASE_URL is set: it is the master key that "
            "protects stored provider keys (32 random bytes, base64)"
        )
    if (
        config.encryption_key is not None
        and config.encryption_key_new is not None
        and config.encryption_key == config.encryption_key_new
    ):
        raise ConfigError("ENCRYPTION_KEY_NEW is the same key as ENCRYPTION_KEY")
    if config.alert_webhook_url is not None and config.alert_webhook_secret is None:
        raise ConfigError(
            "LECTR_ALERT_WEBHOOK_URL is set but LECTR_ALERT_WEBHOOK_SECRET is not: budget "
            "alerts are signed with it (at least 16 characters)"
        )
    oidc_parts = [config.oidc_issuer, config.auth0_domain]
    if any(oidc_parts) and not (config.oidc_audience or config.auth0_audience):
        raise ConfigError(
            "an OIDC issuer is configured but no audience: set LECTR_OIDC_AUDIENCE "
            "(or AUTH0_AUDIENCE)"
        )
