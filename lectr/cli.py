"""``lectr``: the command-line client of the admin API.

A plain synchronous HTTP client (urllib; it never runs a reactor). It finds
the API at ``LECTR_ADMIN_URL`` (default ``http://127.0.0.1:8081``) and
authenticates with ``LECTR_ADMIN_TOKEN`` or, failing that, the token that
development mode wrote into the data directory (``LECTR_DATA_DIR``, default
``./.lectr``).

Output is a table for people, ``--json`` for scripts. Exit status: 0 done,
1 the API refused the request, 2 bad command line, 3 the admin API cannot be
reached, 4 not authenticated or not allowed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn, TextIO

from lectr import __version__

DEFAULT_URL = "http://127.0.0.1:8081"
TIMEOUT = 60.0

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_INTERRUPTED = 130

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


#: what a terminal acts on: C0 and C1 controls, DEL, the line and paragraph
#: separators and the bidirectional overrides and isolates
_TERMINAL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _inert(text: str) -> str:
    """Text from the API as it may go to a terminal: every character a
    terminal would act on (an escape sequence, a carriage return, a line
    break that forges a line) written as its escape, ``\\x1b``."""
    return _TERMINAL_CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def _usable_token(token: str) -> bool:
    """Can ``token`` go in an Authorization header as it is? (Printable
    ASCII without spaces: every admin token and OIDC access token is.)"""
    return token.isascii() and token.isprintable() and " " not in token


def _seg(value: str) -> str:
    """A command-line value as one path segment of an admin API URL."""
    return urllib.parse.quote(value, safe="")


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_API) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = code


class ApiError(CliError):
    def __init__(self, status: int, code: str, message: str) -> None:
        exit_code = EXIT_AUTH if status in (401, 403) else EXIT_API
        super().__init__(f"{message} (HTTP {status}, {code})", exit_code)
        self.status = status
        self.code = code


# --- HTTP ---------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The token must never follow a redirect to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Client:
    def __init__(
        self,
        base_url: str,
        token: str | None,
        timeout: float = TIMEOUT,
        token_file: Path | None = None,
    ) -> None:
        """``token_file``: where the token was read from when it was not
        given (development mode's ``admin.token``), named when it is refused."""
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._token_file = token_file
        self._opener = urllib.request.build_opener(_NoRedirects)

    def request(self, method: str, path: str, body: Any = None, query: dict | None = None) -> Any:
        if self._token is None:
            raise CliError(
                "no admin token: set LECTR_ADMIN_TOKEN, or run where development mode wrote "
                ".lectr/admin.token (or set LECTR_DATA_DIR)",
                EXIT_AUTH,
            )
        if not _usable_token(self._token):
            # (http.client would refuse it with the header, token included)
            source = self._token_file or "LECTR_ADMIN_TOKEN"
            raise CliError(
                f"the admin token in {source} is unusable: it holds a line break, a space, "
                "a control character or a character outside ASCII",
                EXIT_AUTH,
            )
        url = self.base_url + path
        if query:
            pairs = {k: v for k, v in query.items() if v is not None}
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        data = None
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self._timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            try:
                raw = e.read()
            except (OSError, http.client.HTTPException):  # the error body was cut short
                raw = b""
            try:
                error = json.loads(raw)["error"]
                code, message = error["code"], error["message"]
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", e.reason or "request failed"
            if e.code == 401 and self._token_file is not None:
                message = (
                    f"{message}; the token was read from {self._token_file} (development "
                    "mode's): set LECTR_ADMIN_TOKEN to this server's token"
                )
            raise ApiError(e.code, code, message) from None
        except urllib.error.URLError as e:
            reason = getattr(e.reason, "strerror", None) or str(e.reason)
            raise CliError(
                f"cannot reach the admin API at {self.base_url}: {reason} "
                "(is Lectr running? see LECTR_ADMIN_URL)",
                EXIT_UNREACHABLE,
            ) from None
        except (TimeoutError, OSError) as e:
            raise CliError(
                f"cannot reach the admin API at {self.base_url}: {e}", EXIT_UNREACHABLE
            ) from None
        except http.client.HTTPException as e:  # not HTTP (another service), or cut short
            raise CliError(
                f"cannot reach the admin API at {self.base_url}: the answer is not HTTP or was "
                f"cut short ({type(e).__name__}; is LECTR_ADMIN_URL the admin API?)",
                EXIT_UNREACHABLE,
            ) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise CliError(
                f"the answer from {self.base_url} is not JSON: is LECTR_ADMIN_URL the admin API?"
            ) from None

    def get(self, path: str, **query) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def token_and_file(environ: dict[str, str]) -> tuple[str | None, Path | None]:
    """The admin token: LECTR_ADMIN_TOKEN, else the one development mode
    wrote to ``<data-dir>/admin.token`` (and that file's path)."""
    token = environ.get("LECTR_ADMIN_TOKEN", "").strip()
    if token:
        return token, None
    from lectr.devmode import ADMIN_TOKEN_FILE, read_admin_token

    data_dir = Path(environ.get("LECTR_DATA_DIR") or ".lectr").expanduser()
    found = read_admin_token(data_dir)
    return found, (data_dir / ADMIN_TOKEN_FILE if found is not None else None)


# --- output -------------------------------------------------------------------------


def when(value: str | None) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM:SS' UTC."""
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def cell(value: Any) -> str:
    return _inert(_cell(value))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, float):
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    return str(value)


class Output:
    def __init__(self, as_json: bool, out: TextIO = sys.stdout) -> None:
        self.as_json = as_json
        self.out = out

    def line(self, text: str = "") -> None:
        self.out.write(_inert(text) + "\n")

    def json(self, doc: Any) -> None:
        self.out.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")

    def table(self, rows: Sequence[dict], columns: Sequence[tuple[str, Callable]]) -> None:
        """``columns``: (header, row -> value)."""
        cells = [[cell(get(r)) for _, get in columns] for r in rows]
        headers = [h for h, _ in columns]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
        self.line("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        for c in cells:
            self.line("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
        if not rows:
            self.line("(none)")

    def fields(self, pairs: Sequence[tuple[str, Any]]) -> None:
        width = max(len(k) for k, _ in pairs)
        for key, value in pairs:
            self.line(f"{key.ljust(width)}  {cell(value)}")

    def result(self, doc: Any, human: Callable[[], None]) -> None:
        if self.as_json:
            self.json(doc)
        else:
            human()


ORG_COLUMNS = [
    ("ID", lambda o: o["id"]),
    ("NAME", lambda o: o["name"]),
    ("ENABLED", lambda o: o["enabled"]),
    ("ROLE", lambda o: o["role"]),
    ("CREATED", lambda o: when(o["created_at"])),
]
KEY_COLUMNS = [
    ("ID", lambda k: k["id"]),
    ("NAME", lambda k: k["name"]),
    ("PREFIX", lambda k: k["prefix"] + "…"),
    ("ACTIVE", lambda k: k["active"]),
    ("CREATED", lambda k: when(k["created_at"])),
    ("REVOKED", lambda k: when(k["revoked_at"])),
]
PROVIDER_KEY_COLUMNS = [
    ("ID", lambda k: k["id"]),
    ("PROVIDER", lambda k: k["provider"]),
    ("NAME", lambda k: k["name"]),
    ("KEY", lambda k: "…" + k["last4"]),
    ("ENABLED", lambda k: k["enabled"]),
    ("WEIGHT", lambda k: k.get("weight")),
    ("COOLDOWN", lambda k: _cooldown(k.get("cooldown"))),
    ("ADDED", lambda k: when(k["created_at"])),
]
CATALOGUE_COLUMNS = [
    ("NAME", lambda p: p["name"]),
    ("DIALECT", lambda p: p["dialect"]),
    ("BASE URL", lambda p: p["base_url"] or "per key"),
    ("CUSTOM", lambda p: p["custom"]),
    ("DISPLAY NAME", lambda p: p["display_name"]),
]
ROUTE_COLUMNS = [
    ("NAME", lambda r: r["name"]),
    ("STRATEGY", lambda r: r["strategy"]),
    ("TARGETS", lambda r: ", ".join(_target_text(t) for t in r["targets"])),
    ("RETRY ON", lambda r: ",".join(r["retry_on"]) or "-"),
    ("ATTEMPTS", lambda r: r["max_attempts"]),
]


def _cooldown(c: dict | None) -> str:
    return "-" if not c else f"{c['reason']} until {when(c['until'])}"


def _target_text(t: dict) -> str:
    weight = t.get("weight", 1)
    return f"{t['provider']}:{t['model']}" + (f"×{weight}" if weight != 1 else "")


PROVIDER_COLUMNS = [
    ("PROVIDER", lambda p: p["provider"]),
    ("ENABLED", lambda p: p["enabled"]),
    ("ALLOWED MODELS", lambda p: p["allowed_models"] or "all"),
    ("BLOCKED MODELS", lambda p: p["blocked_models"]),
    ("UPDATED", lambda p: when(p["updated_at"])),
]
REQUEST_COLUMNS = [
    ("TIME", lambda r: when(r["created_at"])),
    ("PROVIDER", lambda r: r["provider"]),
    ("MODEL", lambda r: r["model"]),
    ("STATUS", lambda r: r["status"]),
    ("MS", lambda r: r["latency_ms"]),
    ("IN", lambda r: r["prompt_tokens"]),
    ("OUT", lambda r: r["completion_tokens"]),
    ("STREAM", lambda r: r["streamed"]),
    ("REQUEST ID", lambda r: r["request_id"]),
]
_FOLLOW_WIDTHS = (19, 9, 28, 6, 7, 7, 7, 6, 36)
#: requests --follow: rows asked for per poll (the API's most), request ids remembered
_FOLLOW_PAGE = 200
_FOLLOW_SEEN = 10_000


def _follow_line(row: dict, header: bool = False) -> str:
    """One request on one line, in fixed-width columns (a followed stream
    cannot size its columns from rows it has not seen yet)."""
    values = (
        [h for h, _ in REQUEST_COLUMNS]
        if header
        else [cell(get(row)) for _, get in REQUEST_COLUMNS]
    )
    return "  ".join(v.ljust(w) for v, w in zip(values, _FOLLOW_WIDTHS, strict=True)).rstrip()


USAGE_COLUMNS = [
    ("REQUESTS", lambda t: t["requests"]),
    ("ERRORS", lambda t: t["errors"]),
    ("IN TOKENS", lambda t: t["prompt_tokens"]),
    ("OUT TOKENS", lambda t: t["completion_tokens"]),
    ("TOTAL", lambda t: t["total_tokens"]),
    ("CACHED", lambda t: t["cached_tokens"]),
    (
        "CACHE HIT",
        lambda t: f"{t['cache_hit_rate']:.0%}" if t.get("cache_hit_rate") is not None else None,
    ),
    ("COST USD", lambda t: t["cost_usd"]),
    ("UNPRICED", lambda t: t["unpriced"] or None),
]


def _rate(value: str | None) -> str:
    return "-" if value is None else f"${value}"


def _long_context(p: dict) -> str | None:
    lc = p.get("long_context")
    if not lc:
        return None
    return f">{lc['threshold']:,}: ${lc['input']} / ${lc['output']}"


def _tiers(p: dict) -> str | None:
    """Each service tier's input / output rates (its long context marked)."""
    tiers = p.get("tiers")
    if not tiers:
        return None
    return ", ".join(
        f"{name} ${t['input']} / ${t['output']}"
        + (" (+long context)" if t.get("long_context") else "")
        for name, t in tiers.items()
    )


def _web_search(p: dict) -> str | None:
    rate = p.get("web_search")
    return None if rate is None else f"${rate}/1k"


PRICE_COLUMNS = [
    ("PROVIDER", lambda p: p["provider"]),
    ("MODEL", lambda p: p["model"]),
    ("SOURCE", lambda p: p["source"]),
    ("INPUT", lambda p: _rate(p["input"])),
    ("CACHED", lambda p: _rate(p["cached_input"])),
    ("WRITE 5M", lambda p: _rate(p["cache_write_5m"])),
    ("WRITE 1H", lambda p: _rate(p["cache_write_1h"])),
    ("OUTPUT", lambda p: _rate(p["output"])),
    ("LONG CONTEXT", _long_context),
    ("TIERS", _tiers),
    ("WEB SEARCH", _web_search),
    ("MAX OUT", lambda p: p["max_output_tokens"]),
    ("CHECKED", lambda p: p["checked"]),
]


def usage_total(items: list[dict]) -> dict:
    """The sum of usage totals (the same figures as the dashboard's totals):
    counts added, costs added exactly, the cache-hit rate recomputed."""
    total: dict = {"key": "(total)"}
    for name, value in ((n, v) for item in items for n, v in item.items() if n != "key"):
        if type(value) is int:
            total[name] = total.get(name, 0) + value
    cost = sum((Decimal(item.get("cost_usd") or "0") for item in items), Decimal(0))
    total["cost_usd"] = format(cost.normalize(), "f") if cost else "0"
    prompt = total.get("prompt_tokens", 0)
    total["cache_hit_rate"] = round(total.get("cached_tokens", 0) / prompt, 6) if prompt else None
    return total


MEMBER_COLUMNS = [
    ("USER ID", lambda m: m["user_id"]),
    ("SUBJECT", lambda m: m["subject"]),
    ("EMAIL", lambda m: m["email"]),
    ("ROLE", lambda m: m["role"]),
    ("SINCE", lambda m: when(m["created_at"])),
]
USER_COLUMNS = [
    ("ID", lambda u: u["id"]),
    ("SUBJECT", lambda u: u["subject"]),
    ("EMAIL", lambda u: u["email"]),
    ("ADMIN", lambda u: u["is_admin"]),
    ("LAST SEEN", lambda u: when(u["last_seen_at"])),
]


# --- commands ------------------------------------------------------------------------


class Commands:
    def __init__(self, client: Client, out: Output, stdin: TextIO = sys.stdin) -> None:
        self.api = client
        self.out = out
        self.stdin = stdin

    # helpers

    def org_id(self, ref: str) -> str:
        """An org id, or the id of the one org with this name: the exact
        name, else the name compared case-insensitively, as the server
        compares names to keep them unique. Never a guess: when several
        orgs match (data from before names were unique, or letters whose
        case the client and the database fold differently), it refuses."""
        if _UUID_RE.fullmatch(ref):
            return ref.lower()
        orgs = self.api.get("/admin/orgs")["items"]
        wanted = ref.strip()
        matches = [o for o in orgs if o["name"] == wanted] or [
            o for o in orgs if o["name"].lower() == wanted.lower()
        ]
        if not matches:
            raise CliError(f"no organization named {ref!r} (use its id, see 'lectr orgs list')")
        if len(matches) > 1:
            ids = ", ".join(o["id"] for o in matches)
            raise CliError(f"several organizations are named {ref!r}: {ids}; use an id")
        return matches[0]["id"]

    def show_issued(self, key: dict, what: str) -> None:
        self.out.line(f"{what}: {key['key']}")
        self.out.line("Store it now: it is shown this once and cannot be read back.")

    # me, users

    def me(self, args) -> None:
        me = self.api.get("/admin/me")

        def human():
            user = me["user"] or {}
            self.out.fields(
                [
                    ("kind", "admin token" if me["kind"] == "token" else "user"),
                    ("global admin", me["is_admin"]),
                    ("user id", user.get("id")),
                    ("subject", user.get("subject")),
                    ("email", user.get("email")),
                ]
            )
            if me["memberships"]:
                self.out.line()
                self.out.table(
                    me["memberships"],
                    [
                        ("ORG ID", lambda m: m["org_id"]),
                        ("ORG", lambda m: m["org_name"]),
                        ("ROLE", lambda m: m["role"]),
                    ],
                )

        self.out.result(me, human)

    def users_list(self, args) -> None:
        doc = self.api.get("/admin/users")
        self.out.result(doc, lambda: self.out.table(doc["items"], USER_COLUMNS))

    def users_set_admin(self, args, value: bool) -> None:
        user = self.api.put(f"/admin/users/{_seg(args.user_id)}", {"is_admin": value})
        verb = "is now a global admin" if value else "is no longer a global admin"
        self.out.result(user, lambda: self.out.line(f"{user['subject']} {verb}"))

    # orgs

    def orgs_list(self, args) -> None:
        doc = self.api.get("/admin/orgs")
        self.out.result(doc, lambda: self.out.table(doc["items"], ORG_COLUMNS))

    def orgs_create(self, args) -> None:
        body = {"name": args.name}
        if args.key_name:
            body["key_name"] = args.key_name
        doc = self.api.post("/admin/orgs", body)

        def human():
            org = doc["org"]
            self.out.line(f"Created organization {org['name']} ({org['id']})")
            self.show_issued(doc["key"], "Its first Lectr key")

        self.out.result(doc, human)

    def orgs_show(self, args) -> None:
        org = self.api.get(f"/admin/orgs/{self.org_id(args.org)}")
        self.out.result(
            org,
            lambda: self.out.fields(
                [
                    ("id", org["id"]),
                    ("name", org["name"]),
                    ("enabled", org["enabled"]),
                    ("your role", org["role"]),
                    ("created", when(org["created_at"])),
                    ("updated", when(org["updated_at"])),
                ]
            ),
        )

    def orgs_rename(self, args) -> None:
        org = self.api.put(f"/admin/orgs/{self.org_id(args.org)}", {"name": args.name})
        self.out.result(org, lambda: self.out.line(f"Renamed to {org['name']}"))

    def orgs_set_enabled(self, args, enabled: bool) -> None:
        org_id = self.org_id(args.org)
        org = self.api.put(f"/admin/orgs/{org_id}/enabled", {"enabled": enabled})
        state = "enabled" if enabled else "disabled: its keys are refused from now on"
        self.out.result(org, lambda: self.out.line(f"{org['name']} {state}"))

    def orgs_delete(self, args) -> None:
        org_id = self.org_id(args.org)
        if not args.yes:
            if not self.stdin.isatty():
                raise CliError("deleting an organization needs --yes", EXIT_USAGE)
            answer = input(f"Delete organization {args.org} and all its data? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CliError("not deleted", EXIT_USAGE)
        self.api.delete(f"/admin/orgs/{org_id}")
        doc = {"deleted": org_id}
        self.out.result(doc, lambda: self.out.line(f"Deleted organization {org_id}"))

    def orgs_rotate_key(self, args) -> None:
        body = {"name": args.name} if args.name else None
        key = self.api.post(f"/admin/orgs/{self.org_id(args.org)}/rotate-key", body)

        def human():
            self.out.line("Every previous key of the organization is revoked.")
            self.show_issued(key, "New Lectr key")

        self.out.result(key, human)

    # keys

    def keys_list(self, args) -> None:
        doc = self.api.get(f"/admin/orgs/{self.org_id(args.org)}/keys")
        self.out.result(doc, lambda: self.out.table(doc["items"], KEY_COLUMNS))

    def keys_create(self, args) -> None:
        body = {"name": args.name} if args.name else None
        key = self.api.post(f"/admin/orgs/{self.org_id(args.org)}/keys", body)
        self.out.result(key, lambda: self.show_issued(key, f"Lectr key {key['name']}"))

    def keys_revoke(self, args) -> None:
        self.api.delete(f"/admin/orgs/{self.org_id(args.org)}/keys/{_seg(args.key_id)}")
        doc = {"revoked": args.key_id}
        self.out.result(doc, lambda: self.out.line(f"Revoked key {args.key_id}"))

    # provider keys

    def read_secret(self, args) -> str:
        """The provider key: from an environment variable, from standard
        input, or typed at a hidden prompt; never from the command line
        (it would land in the shell history and in ps)."""
        if args.key_env:
            value = os.environ.get(args.key_env, "")
            if not value.strip():
                raise CliError(f"the environment variable {args.key_env} is empty", EXIT_USAGE)
            return value.strip()
        if not self.stdin.isatty():
            value = self.stdin.readline()
        else:
            value = getpass.getpass(f"{args.provider} API key (input hidden): ")
        if not value.strip():
            raise CliError("no key given", EXIT_USAGE)
        return value.strip()

    def provider_keys_add(self, args) -> None:
        org_id = self.org_id(args.org)
        body = {"provider": args.provider, "key": self.read_secret(args)}
        for field in ("name", "weight", "base_url", "api_version"):
            value = getattr(args, field)
            if value is not None:
                body[field] = value
        info = self.api.post(f"/admin/orgs/{org_id}/provider-keys", body)
        self.out.result(
            info,
            lambda: self.out.line(
                f"Added {info['provider']} key …{info['last4']} ({info['id']}); "
                "the provider accepted it"
            ),
        )

    def provider_keys_list(self, args) -> None:
        doc = self.api.get(f"/admin/orgs/{self.org_id(args.org)}/provider-keys")
        self.out.result(doc, lambda: self.out.table(doc["items"], PROVIDER_KEY_COLUMNS))

    def provider_keys_set(self, args) -> None:
        body: dict[str, Any] = {}
        for field in ("enabled", "weight", "name"):
            value = getattr(args, field)
            if value is not None:
                body[field] = value
        if not body:
            raise CliError("nothing to change: give --enable/--disable, --weight or --name", 2)
        doc = self.api.request(
            "PATCH",
            f"/admin/orgs/{self.org_id(args.org)}/provider-keys/{_seg(args.key_id)}",
            body,
        )
        self.out.result(doc, lambda: self.out.table([doc], PROVIDER_KEY_COLUMNS))

    def provider_keys_delete(self, args) -> None:
        self.api.delete(f"/admin/orgs/{self.org_id(args.org)}/provider-keys/{_seg(args.key_id)}")
        doc = {"deleted": args.key_id}
        self.out.result(doc, lambda: self.out.line(f"Deleted provider key {args.key_id}"))

    # providers

    def providers_list(self, args) -> None:
        doc = self.api.get(f"/admin/orgs/{self.org_id(args.org)}/providers")
        self.out.result(doc, lambda: self.out.table(doc["items"], PROVIDER_COLUMNS))

    def providers_set(self, args) -> None:
        body: dict[str, Any] = {}
        if args.enabled is not None:
            body["enabled"] = args.enabled
        if args.allow_all:
            body["allowed_models"] = []
        elif args.allow:
            body["allowed_models"] = args.allow
        if args.unblock_all:
            body["blocked_models"] = []
        elif args.block:
            body["blocked_models"] = args.block
        if not body:
            raise CliError(
                "nothing to change: give --enable/--disable, --allow, --allow-all, --block or "
                "--unblock-all",
                EXIT_USAGE,
            )
        doc = self.api.put(
            f"/admin/orgs/{self.org_id(args.org)}/providers/{_seg(args.provider)}", body
        )
        self.out.result(doc, lambda: self.out.table([doc], PROVIDER_COLUMNS))

    # the provider catalogue

    def catalogue_list(self, args) -> None:
        doc = self.api.get("/admin/providers")
        self.out.result(doc, lambda: self.out.table(doc["items"], CATALOGUE_COLUMNS))

    def catalogue_set(self, args) -> None:
        body = {"dialect": args.dialect, "base_url": args.base_url, "auth": args.auth}
        if args.display_name:
            body["display_name"] = args.display_name
        if args.models_path:
            body["models_path"] = args.models_path
        doc = self.api.put(f"/admin/providers/{_seg(args.name)}", body)
        self.out.result(doc, lambda: self.out.table([doc], CATALOGUE_COLUMNS))

    def catalogue_delete(self, args) -> None:
        self.api.delete(f"/admin/providers/{_seg(args.name)}")
        doc = {"deleted": args.name}
        self.out.result(doc, lambda: self.out.line(f"Deleted provider {args.name}"))

    # routes

    def routes_list(self, args) -> None:
        doc = self.api.get(f"/admin/orgs/{self.org_id(args.org)}/routes")
        self.out.result(doc, lambda: self.out.table(doc["items"], ROUTE_COLUMNS))

    def routes_set(self, args) -> None:
        targets = []
        for spec in args.target:
            provider, sep, rest = spec.partition(":")
            model, star, weight = rest.rpartition("*") if "*" in rest else (rest, "", "")
            if not sep or not provider or not model:
                raise CliError(f"--target {spec!r}: expected PROVIDER:MODEL[*WEIGHT]", EXIT_USAGE)
            target: dict[str, Any] = {"provider": provider, "model": model}
            if star:
                if not weight.isdigit():
                    raise CliError(f"--target {spec!r}: the weight must be a number", EXIT_USAGE)
                target["weight"] = int(weight)
            targets.append(target)
        body: dict[str, Any] = {"targets": targets, "strategy": args.strategy}
        if args.retry_on is not None:
            body["retry_on"] = [r for r in args.retry_on.split(",") if r]
        if args.max_attempts is not None:
            body["max_attempts"] = args.max_attempts
        if args.attempt_timeout is not None:
            body["attempt_timeout"] = args.attempt_timeout
        name = _seg(args.name)
        doc = self.api.put(f"/admin/orgs/{self.org_id(args.org)}/routes/{name}", body)
        self.out.result(doc, lambda: self.out.table([doc], ROUTE_COLUMNS))

    def routes_delete(self, args) -> None:
        name = _seg(args.name)
        self.api.delete(f"/admin/orgs/{self.org_id(args.org)}/routes/{name}")
        doc = {"deleted": args.name}
        self.out.result(doc, lambda: self.out.line(f"Deleted route {args.name}"))

    def routes_explain(self, args) -> None:
        body: dict[str, Any] = {"path": args.path, "body": {"model": args.model}}
        if args.session:
            body["headers"] = {"x-lectr-session": args.session}
        doc = self.api.post(f"/admin/orgs/{self.org_id(args.org)}/routes/explain", body)

        def human() -> None:
            if doc["refusal"]:
                r = doc["refusal"]
                self.out.line(f"refused: {r['status']} {r['kind']}: {r['message']}")
                return
            route = doc["route"]
            self.out.line(f"route: {route['name'] if route else '-'}  model: {doc['model']}")
            self.out.table(
                doc["attempts"],
                [
                    ("ATTEMPT", lambda a: a["attempt"]),
                    ("PROVIDER", lambda a: a["provider"]),
                    ("MODEL", lambda a: a["model"]),
                    ("KEY", lambda a: a["key"]["name"]),
                ],
            )

        self.out.result(doc, human)

    # limits and budgets

    def key_id(self, org_id: str, ref: str) -> str:
        """A key id, or the id of the org's one active key with this name."""
        if _UUID_RE.fullmatch(ref):
            return ref.lower()
        keys = [k for k in self.api.get(f"/admin/orgs/{org_id}/keys")["items"] if k["active"]]
        matches = [k for k in keys if k["name"] == ref]
        if not matches:
            raise CliError(f"no active key named {ref!r} (use its id, see 'lectr keys list')")
        if len(matches) > 1:
            ids = ", ".join(k["id"] for k in matches)
            raise CliError(f"several active keys are named {ref!r}: {ids}; use an id")
        return matches[0]["id"]

    def limits_path(self, args) -> str:
        org_id = self.org_id(args.org)
        if args.key:
            return f"/admin/orgs/{org_id}/keys/{self.key_id(org_id, args.key)}/limits"
        return f"/admin/orgs/{org_id}/limits"

    def show_limits(self, doc: dict) -> None:
        usage = doc["usage"]
        scope = f"key {doc['key_id']}" if doc["key_id"] else "organization"
        self.out.fields(
            [
                ("limits of", f"{scope} (org {doc['org_id']})" if doc["key_id"] else scope),
                (
                    "requests/min",
                    _with_use(doc["rpm"], usage["requests_this_minute"], "this minute"),
                ),
                ("tokens/min", _with_use(doc["tpm"], usage["tokens_this_minute"], "this minute")),
                ("concurrent", _with_use(doc["max_concurrent"], usage["concurrent"], "now")),
                ("USD per day", _with_use(doc["usd_per_day"], usage["usd_today"], "today (UTC)")),
                (
                    "USD per month",
                    _with_use(doc["usd_per_month"], usage["usd_this_month"], "this month"),
                ),
                ("updated", when(doc["updated_at"]) if doc["updated_at"] else "(no limits)"),
            ]
        )

    def limits_show(self, args) -> None:
        doc = self.api.get(self.limits_path(args))
        self.out.result(doc, lambda: self.show_limits(doc))

    def limits_set(self, args) -> None:
        body = {
            name: value
            for name, value in (
                ("rpm", args.rpm),
                ("tpm", args.tpm),
                ("max_concurrent", args.concurrent),
                ("usd_per_day", args.usd_per_day),
                ("usd_per_month", args.usd_per_month),
            )
            if value is not _UNSET
        }
        if not body:
            raise CliError(
                "nothing to change: give --rpm, --tpm, --concurrent, --usd-per-day or "
                "--usd-per-month (a value, or 'none' to remove the limit)",
                EXIT_USAGE,
            )
        doc = self.api.put(self.limits_path(args), body)
        self.out.result(doc, lambda: self.show_limits(doc))

    def limits_clear(self, args) -> None:
        body = dict.fromkeys(("rpm", "tpm", "max_concurrent", "usd_per_day", "usd_per_month"))
        doc = self.api.put(self.limits_path(args), body)
        self.out.result(doc, lambda: self.show_limits(doc))

    # requests and usage

    def requests(self, args) -> None:
        org_id = self.org_id(args.org)
        path = f"/admin/orgs/{org_id}/requests"
        filters = {
            "provider": args.provider,
            "model": args.model,
            "key_id": args.key_id,
            "status": args.status,
            "since": args.since,
            "until": args.until,
        }
        if not args.follow:
            page = self.api.get(path, limit=args.limit, cursor=args.cursor, **filters)

            def human():
                self.out.table(page["items"], REQUEST_COLUMNS)
                if page["next_cursor"]:
                    self.out.line(f"more: --cursor {page['next_cursor']}")

            self.out.result(page, human)
            return
        self.follow(path, filters, args)

    def follow(self, path: str, filters: dict, args) -> None:
        """Print new requests as they are logged (oldest first): the newest
        ``--limit`` first, then, every ``--interval`` seconds, every request
        stored since (the API's ``after`` cursor, page after page in a
        burst); JSON Lines with --json. Like the dashboard, each poll starts
        from the cursor of the poll before the last, so a row committed late
        by another node is still printed; repeats are dropped by id."""
        seen: dict[str, None] = {}  # request ids printed, oldest first
        polls = 0
        if not self.out.as_json:
            self.out.line(_follow_line({}, header=True))
        page = self.api.get(path, limit=args.limit, **filters)
        rows = list(reversed(page["items"]))
        cursors = [page["live_cursor"]]
        more = False  # the last page was full: more are waiting
        while True:
            for row in rows:
                if row["request_id"] in seen:
                    continue
                seen[row["request_id"]] = None
                if self.out.as_json:
                    self.out.out.write(json.dumps(row) + "\n")
                else:
                    self.out.line(_follow_line(row))
            self.out.out.flush()
            while len(seen) > _FOLLOW_SEEN:
                del seen[next(iter(seen))]
            polls += 1
            if args.max_polls is not None and polls >= args.max_polls:
                return
            if not more:
                time.sleep(args.interval)
            page = self.api.get(path, limit=_FOLLOW_PAGE, after=cursors[0], **filters)
            rows = page["items"]  # (in the order they were stored)
            more = len(rows) == _FOLLOW_PAGE
            rows = sorted(rows, key=lambda r: r["created_at"])
            # after a full page, go on right after it
            cursors = [page["live_cursor"]] if more else [cursors[-1], page["live_cursor"]]

    def usage(self, args) -> None:
        if args.explain:
            self.explain(args.explain)
            return
        if not args.org:
            raise CliError("name the organization (id or name), or use --explain", EXIT_USAGE)
        org_id = self.org_id(args.org)
        doc = self.api.get(
            f"/admin/orgs/{org_id}/usage", since=args.since, until=args.until, group_by=args.by
        )

        def human():
            self.out.line(f"{when(doc['since'])} to {when(doc['until'])} (UTC), by {args.by}")
            label = args.by.upper()
            rows = list(doc["items"])
            if rows:
                rows.append(usage_total(rows))
            self.out.table(rows, [(label, lambda t: t["key"]), *USAGE_COLUMNS])

        self.out.result(doc, human)

    def explain(self, request_id: str) -> None:
        if not _UUID_RE.fullmatch(request_id):
            raise CliError("the request id is a UUID (x-lectr-request-id)", EXIT_USAGE)
        doc = self.api.get(f"/admin/requests/{request_id}")

        def human():
            r = doc["request"]
            served = r["response_model"]
            model = r["model"] or "-"
            if served and served != r["model"]:
                model += f" (served: {served})"
            counts = [f"prompt {r['prompt_tokens']}"]
            if r["cached_tokens"]:
                counts.append(f"cached {r['cached_tokens']}")
            if r["cache_creation_tokens"]:
                one_hour = r["cache_creation_1h_tokens"] or 0
                counts.append(f"cache writes {r['cache_creation_tokens']} (1h: {one_hour})")
            counts.append(f"completion {r['completion_tokens']}")
            if r["reasoning_tokens"]:
                counts.append(f"of which reasoning {r['reasoning_tokens']}")
            if r.get("web_search_requests"):
                counts.append(f"web searches {r['web_search_requests']}")
            fields = [
                ("request", r["request_id"]),
                ("time", when(r["created_at"])),
                ("route", f"{r['provider']} {r['method']} {r['path']} -> {r['status']}"),
                ("model", model),
            ]
            if r.get("service_tier") is not None:
                fields.append(("service tier", r["service_tier"]))
            fields += [
                ("usage", f"{r['usage_source']}: " + ", ".join(counts)),
                ("cost", f"${r['cost_usd']}" if r["cost_usd"] is not None else "unpriced"),
            ]
            self.out.fields(fields)
            self.out.line()
            self.out.line(doc["note"])
            if doc["lines"]:
                self.out.line()
                width = max(
                    len(f"{line['tokens'] if 'tokens' in line else line['searches']:,}")
                    for line in doc["lines"]
                )
                for line in doc["lines"]:
                    if "searches" in line:  # (kind web_search)
                        self.out.line(
                            f"  {line['kind']:<15} {line['searches']:>{width},} searches x "
                            f"${line['usd_per_thousand']}/1k = ${line['cost_usd']}"
                        )
                        continue
                    self.out.line(
                        f"  {line['kind']:<15} {line['tokens']:>{width},} tokens x "
                        f"${line['usd_per_million']}/M = ${line['cost_usd']}"
                    )
                verdict = (
                    "matches the recorded cost"
                    if doc["matches"]
                    else "DIFFERS from the recorded cost"
                )
                self.out.line(f"  {'total':<15} ${doc['total_usd']} ({verdict})")
            if doc["usage_raw"]:
                self.out.line()
                self.out.line(f"provider's usage: {doc['usage_raw']}")

        self.out.result(doc, human)

    # prices

    def pricing_list(self, args) -> None:
        doc = self.api.get("/admin/pricing", provider=args.provider, model=args.model)

        def human():
            self.out.table(doc["items"], PRICE_COLUMNS)
            if args.model and not doc["items"]:
                self.out.line(f"{args.model} has no price on {args.provider}: it is unpriced")

        self.out.result(doc, human)

    def pricing_set(self, args) -> None:
        body: dict[str, Any] = {
            "provider": args.provider,
            "model": args.model,
            "input": args.input,
            "output": args.output,
            "checked": args.checked or datetime.now(UTC).date().isoformat(),
        }
        for name in ("cached_input", "cache_write_5m", "cache_write_1h", "max_output_tokens"):
            if getattr(args, name) is not None:
                body[name] = getattr(args, name)
        if args.note is not None:
            body["note"] = args.note
        if args.long_context_threshold is not None:
            if args.long_context_input is None or args.long_context_output is None:
                raise CliError(
                    "--long-context-threshold needs --long-context-input and --long-context-output",
                    EXIT_USAGE,
                )
            body["long_context"] = {
                "threshold": args.long_context_threshold,
                "input": args.long_context_input,
                "output": args.long_context_output,
            }
        if args.tier:
            body["tiers"] = tiers = {}
            for name, rates in map(_tier_spec, args.tier):
                if name in tiers:
                    raise CliError(f"--tier {name!r} is given twice", EXIT_USAGE)
                tiers[name] = rates
        if args.web_search is not None:
            body["web_search"] = args.web_search
        doc = self.api.put("/admin/pricing", body)
        self.out.result(doc, lambda: self.out.table([doc], PRICE_COLUMNS))

    def pricing_unset(self, args) -> None:
        self.api.request(
            "DELETE", "/admin/pricing", query={"provider": args.provider, "model": args.model}
        )
        doc = self.api.get("/admin/pricing", provider=args.provider, model=args.model)

        def human():
            self.out.line(f"Removed the price override of {args.provider}/{args.model}")
            if doc["items"]:
                self.out.line("now priced as:")
                self.out.table(doc["items"], PRICE_COLUMNS)
            else:
                self.out.line("it is now unpriced")

        self.out.result(doc, human)

    # members

    def members_list(self, args) -> None:
        doc = self.api.get(f"/admin/orgs/{self.org_id(args.org)}/members")
        self.out.result(doc, lambda: self.out.table(doc["items"], MEMBER_COLUMNS))

    def members_add(self, args) -> None:
        body = {"role": args.role}
        for name in ("user_id", "email", "subject"):
            if getattr(args, name):
                body[name] = getattr(args, name)
        member = self.api.post(f"/admin/orgs/{self.org_id(args.org)}/members", body)
        self.out.result(member, lambda: self.out.line(f"{member['subject']} is {member['role']}"))

    def members_remove(self, args) -> None:
        self.api.delete(f"/admin/orgs/{self.org_id(args.org)}/members/{_seg(args.user_id)}")
        doc = {"removed": args.user_id}
        self.out.result(doc, lambda: self.out.line(f"Removed member {args.user_id}"))

    # vault

    def rotation_status(self, args) -> None:
        doc = self.api.get("/admin/vault/rotation")

        def human():
            self.out.fields(
                [
                    ("current master key", doc["current_kek"]),
                    ("next master key", doc["next_kek"] or "(none: ENCRYPTION_KEY_NEW unset)"),
                    ("rotation", "done" if doc["done"] else "in progress"),
                ]
            )
            self.out.line()
            rows = [{"kek": k, "n": n} for k, n in sorted(doc["rows_by_kek"].items())]
            self.out.table(
                rows, [("MASTER KEY", lambda r: r["kek"]), ("PROVIDER KEYS", lambda r: r["n"])]
            )

        self.out.result(doc, human)


# --- the command line -----------------------------------------------------------------

_UNSET = object()


def _with_use(limit: Any, used: Any, when_: str) -> str:
    shown = "none" if limit is None else str(limit)
    return f"{shown}  ({used} {when_})"


def _count_or_none(raw: str) -> int | None:
    if raw.strip().lower() in ("none", "off", "null"):
        return None
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError("expected a whole number, or 'none'") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1 (or 'none')")
    return value


_TIER_RATE_KINDS = ("input", "output", "cached_input", "cache_write_5m", "cache_write_1h")


def _tier_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``--tier NAME:KIND=USD[,KIND=USD...]`` as (name, rates); the server
    checks the name and the rates."""
    name, sep, rest = spec.partition(":")
    usage = f"--tier {spec!r}: expected NAME:input=USD,output=USD[,cached_input=USD...]"
    if not sep or not name or not rest:
        raise CliError(usage, EXIT_USAGE)
    rates: dict[str, str] = {}
    for part in rest.split(","):
        kind, eq, value = part.partition("=")
        kind, value = kind.strip(), value.strip()
        if not eq or not value or kind not in _TIER_RATE_KINDS or kind in rates:
            raise CliError(
                usage + f" (rates: {', '.join(_TIER_RATE_KINDS)}, each once)", EXIT_USAGE
            )
        rates[kind] = value
    return name, rates


def _usd_or_none(raw: str) -> str | None:
    value = raw.strip().removeprefix("$")
    if value.lower() in ("none", "off", "null"):
        return None
    if not re.fullmatch(r"[0-9]{1,10}(\.[0-9]{1,6})?", value):
        raise argparse.ArgumentTypeError("expected an amount of USD such as 25 or 12.50, or 'none'")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not (value > 0 and math.isfinite(value)):  # (NaN is neither above nor below 0)
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    from lectr.providers.registry import discover

    providers_help = ", ".join(cls.name for cls in discover()) + ", or a custom provider"

    def options(suppress: bool) -> argparse.ArgumentParser:
        # --url and --json go before or after the command; the copies on the
        # subcommands must not reset what was given before them
        extra = {"default": argparse.SUPPRESS} if suppress else {}
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument(
            "--url", help=f"admin API URL (default: $LECTR_ADMIN_URL or {DEFAULT_URL})", **extra
        )
        p.add_argument("--json", action="store_true", help="print JSON for scripts", **extra)
        return p

    common = options(suppress=True)
    parser = argparse.ArgumentParser(
        prog="lectr",
        parents=[options(suppress=False)],
        description="Manage a Lectr gateway through its admin API.",
        epilog=(
            "Token: $LECTR_ADMIN_TOKEN (the admin token, or an OIDC access token), else the "
            "development token in $LECTR_DATA_DIR/admin.token (default ./.lectr). Exit status: "
            "0 ok, 1 refused by the API, 2 usage, 3 unreachable, 4 not authenticated/allowed."
        ),
    )
    parser.add_argument("--version", action="version", version=f"lectr {__version__}")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def group(name: str, help: str):
        p = groups.add_parser(name, help=help, parents=[common])
        return p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def command(sub, name: str, help: str, handler: str, *extra, **defaults):
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(handler=handler, handler_extra=extra, **defaults)
        return p

    me = groups.add_parser("me", help="who you are, and your orgs", parents=[common])
    me.set_defaults(handler="me", handler_extra=())

    orgs = group("orgs", "organizations")
    p = command(orgs, "list", "list the organizations you can see", "orgs_list")
    p = command(orgs, "create", "create an organization (prints its first key)", "orgs_create")
    p.add_argument("name")
    p.add_argument("--key-name", help="name of the first key (default: default)")
    p = command(orgs, "show", "show an organization", "orgs_show")
    p.add_argument("org", help="id or name")
    p = command(orgs, "rename", "rename an organization", "orgs_rename")
    p.add_argument("org", help="id or name")
    p.add_argument("name")
    p = command(
        orgs, "enable", "enable an organization (undo the kill switch)", "orgs_set_enabled", True
    )
    p.add_argument("org", help="id or name")
    p = command(
        orgs, "disable", "kill switch: refuse all of the org's keys", "orgs_set_enabled", False
    )
    p.add_argument("org", help="id or name")
    p = command(orgs, "delete", "delete an organization and all its data", "orgs_delete")
    p.add_argument("org", help="id or name")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = command(
        orgs, "rotate-key", "revoke all of the org's keys, issue a new one", "orgs_rotate_key"
    )
    p.add_argument("org", help="id or name")
    p.add_argument("--name", help="name of the new key (default: default)")

    keys = group("keys", "Lectr keys (lc_…)")
    p = command(keys, "list", "list an org's keys (prefixes only)", "keys_list")
    p.add_argument("org", help="id or name")
    p = command(keys, "create", "create a named key (shown once)", "keys_create")
    p.add_argument("org", help="id or name")
    p.add_argument("--name", help="key name (default: default)")
    p = command(keys, "revoke", "revoke a key", "keys_revoke")
    p.add_argument("org", help="id or name")
    p.add_argument("key_id")

    pkeys = group("provider-keys", "provider API keys (BYOK)")
    p = command(
        pkeys, "add", "add a provider key (checked with the provider first)", "provider_keys_add"
    )
    p.add_argument("org", help="id or name")
    p.add_argument("provider", help=f"a provider of the catalogue ({providers_help})")
    p.add_argument("--name", help="a name for the key")
    p.add_argument("--weight", type=int, help="share of the pool's requests (default 1)")
    p.add_argument("--base-url", help="the key's own endpoint (Azure: the resource's URL)")
    p.add_argument("--api-version", help="Azure api-version")
    p.add_argument(
        "--key-env",
        metavar="VAR",
        help="read the key from this environment variable (default: standard input, or a "
        "hidden prompt)",
    )
    p = command(
        pkeys, "list", "list an org's provider keys (last 4 characters)", "provider_keys_list"
    )
    p.add_argument("org", help="id or name")
    p = command(
        pkeys, "set", "enable/disable a key, change its weight or name", "provider_keys_set"
    )
    p.add_argument("org", help="id or name")
    p.add_argument("key_id")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--enable", dest="enabled", action="store_const", const=True)
    state.add_argument("--disable", dest="enabled", action="store_const", const=False)
    p.set_defaults(enabled=None)
    p.add_argument("--weight", type=int)
    p.add_argument("--name")
    p = command(pkeys, "delete", "delete a provider key", "provider_keys_delete")
    p.add_argument("org", help="id or name")
    p.add_argument("key_id")

    providers = group("providers", "per-org provider settings")
    p = command(providers, "list", "show an org's provider settings", "providers_list")
    p.add_argument("org", help="id or name")
    p = command(providers, "set", "change an org's settings for one provider", "providers_set")
    p.add_argument("org", help="id or name")
    p.add_argument("provider", help=f"a provider of the catalogue ({providers_help})")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--enable", dest="enabled", action="store_const", const=True)
    state.add_argument("--disable", dest="enabled", action="store_const", const=False)
    p.set_defaults(enabled=None)
    allow = p.add_mutually_exclusive_group()
    allow.add_argument(
        "--allow",
        action="append",
        metavar="MODEL",
        help="allow only these models (repeat; 'prefix*' patterns); replaces the list",
    )
    allow.add_argument("--allow-all", action="store_true", help="allow every model")
    block = p.add_mutually_exclusive_group()
    block.add_argument(
        "--block", action="append", metavar="MODEL", help="block these models (replaces the list)"
    )
    block.add_argument("--unblock-all", action="store_true", help="block no model")

    catalogue = group("catalogue", "the provider catalogue (custom providers: global admins)")
    command(catalogue, "list", "list built-in and custom providers", "catalogue_list")
    p = command(catalogue, "set", "create or replace a custom provider", "catalogue_set")
    p.add_argument("name", help="route prefix: /<name>/v1/...")
    p.add_argument("--dialect", required=True, choices=["openai", "anthropic"])
    p.add_argument("--base-url", required=True, help="origin (and prefix) before /v1")
    p.add_argument("--auth", default="bearer", choices=["bearer", "x-api-key", "api-key"])
    p.add_argument("--display-name")
    p.add_argument("--models-path", help="key validation path (default /v1/models)")
    p = command(catalogue, "delete", "delete a custom provider", "catalogue_delete")
    p.add_argument("name")

    routes = group("routes", "an org's routes (virtual models with fallbacks)")
    p = command(routes, "list", "list an org's routes", "routes_list")
    p.add_argument("org", help="id or name")
    p = command(routes, "set", "create or replace a route", "routes_set")
    p.add_argument("org", help="id or name")
    p.add_argument("name", help="the model name clients will send")
    p.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="PROVIDER:MODEL[*WEIGHT]",
        help="a target, in order (repeat)",
    )
    p.add_argument("--strategy", choices=["fallback", "weighted"], default="fallback")
    p.add_argument("--retry-on", help="comma-separated: 429,5xx,timeout,connect (default all)")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--attempt-timeout", type=float, help="seconds per attempt")
    p = command(routes, "delete", "delete a route", "routes_delete")
    p.add_argument("org", help="id or name")
    p.add_argument("name")
    p = command(routes, "explain", "the plan Lectr would follow now (no call)", "routes_explain")
    p.add_argument("org", help="id or name")
    p.add_argument("--model", required=True, help="the model (or route name) a client sends")
    p.add_argument("--path", default="/v1/chat/completions", help="the proxy path")
    p.add_argument("--session", help="an x-lectr-session value")
    limits = group("limits", "limits and budgets of an org or of one of its keys")
    for name, help_, handler in (
        ("show", "show the limits and the current consumption", "limits_show"),
        ("set", "set limits (the others keep their values)", "limits_set"),
        ("clear", "remove every limit", "limits_clear"),
    ):
        p = command(limits, name, help_, handler)
        p.add_argument("org", help="id or name")
        p.add_argument(
            "--key", help="a Lectr key (id, or name of an active key) instead of the org"
        )
        if name != "set":
            continue
        p.set_defaults(
            rpm=_UNSET, tpm=_UNSET, concurrent=_UNSET, usd_per_day=_UNSET, usd_per_month=_UNSET
        )
        p.add_argument("--rpm", type=_count_or_none, help="requests per UTC minute, or 'none'")
        p.add_argument("--tpm", type=_count_or_none, help="tokens per UTC minute, or 'none'")
        p.add_argument(
            "--concurrent", type=_count_or_none, help="requests in flight at once, or 'none'"
        )
        p.add_argument(
            "--usd-per-day", type=_usd_or_none, metavar="USD", help="budget per UTC day, or 'none'"
        )
        p.add_argument(
            "--usd-per-month",
            type=_usd_or_none,
            metavar="USD",
            help="budget per calendar month (UTC), or 'none'",
        )

    p = groups.add_parser("requests", help="an org's recent requests", parents=[common])
    p.set_defaults(handler="requests", handler_extra=())
    p.add_argument("org", help="id or name")
    p.add_argument("--limit", type=int, default=50, help="rows per page (1-200)")
    p.add_argument("--cursor", help="continue after a previous page")
    p.add_argument("--provider", help=f"one provider ({providers_help})")
    p.add_argument("--model")
    p.add_argument("--key-id", help="a Lectr key's id")
    p.add_argument("--status", help="429, 4xx, or 'error'")
    p.add_argument("--since", help="ISO 8601 date or time (UTC unless an offset is given)")
    p.add_argument("--until", help="ISO 8601 date or time")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new requests")
    p.add_argument("--interval", type=_positive_float, default=2.0, help="seconds between polls")
    p.add_argument("--max-polls", type=int, default=None, help=argparse.SUPPRESS)

    p = groups.add_parser(
        "usage", help="an org's usage and cost totals, or one request's cost", parents=[common]
    )
    p.set_defaults(handler="usage", handler_extra=())
    p.add_argument("org", nargs="?", help="id or name (not needed with --explain)")
    p.add_argument("--since", help="ISO 8601, rounded down to the hour (default: 30 days ago)")
    p.add_argument("--until", help="ISO 8601, rounded up to the hour (default: now)")
    p.add_argument("--by", choices=["model", "provider", "key", "day", "hour"], default="model")
    p.add_argument(
        "--explain",
        metavar="REQUEST_ID",
        help="one request: its tokens, the prices used (with their date) and the arithmetic",
    )

    prices = group("pricing", "the price table (changes: global admins only)")
    p = command(prices, "list", "the prices in effect (catalogue and overrides)", "pricing_list")
    p.add_argument("--provider")
    p.add_argument("--model", help="the one entry that prices this model (needs --provider)")
    p = command(prices, "set", "set a model's price (USD per million tokens)", "pricing_set")
    p.add_argument("provider")
    p.add_argument("model")
    p.add_argument("--input", required=True, help="prompt tokens (not cached)")
    p.add_argument("--output", required=True, help="completion tokens, reasoning included")
    p.add_argument("--cached-input", help="prompt tokens read from the cache (default: input)")
    p.add_argument("--cache-write-5m", help="prompt tokens written to the cache, 5-minute TTL")
    p.add_argument("--cache-write-1h", help="prompt tokens written to the cache, 1-hour TTL")
    p.add_argument("--long-context-threshold", type=int, metavar="TOKENS")
    p.add_argument("--long-context-input")
    p.add_argument("--long-context-output")
    p.add_argument(
        "--tier",
        action="append",
        metavar="NAME:input=USD,output=USD[,cached_input=USD...]",
        help="a service tier's rates, by the name the provider reports (e.g. flex, priority); "
        "a request served at it is priced at them (repeat for each tier)",
    )
    p.add_argument("--web-search", metavar="USD", help="USD per 1,000 server-side web searches")
    p.add_argument("--max-output-tokens", type=int)
    p.add_argument("--checked", help="the date the price was checked (default: today)")
    p.add_argument("--note")
    p = command(prices, "unset", "remove a price override", "pricing_unset")
    p.add_argument("provider")
    p.add_argument("model")

    members = group("members", "org members and roles (owners only)")
    p = command(members, "list", "list an org's members", "members_list")
    p.add_argument("org", help="id or name")
    p = command(members, "add", "add a member or change a member's role", "members_add")
    p.add_argument("org", help="id or name")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id")
    who.add_argument("--email", help="of a user who has signed in")
    who.add_argument("--subject", help="OIDC subject; works before their first sign-in")
    p.add_argument("--role", choices=["owner", "admin", "member"], default="member")
    p = command(members, "remove", "remove a member", "members_remove")
    p.add_argument("org", help="id or name")
    p.add_argument("user_id")

    users = group("users", "user identities (global admins only)")
    command(users, "list", "list the users who have signed in", "users_list")
    p = command(users, "grant-admin", "make a user a global admin", "users_set_admin", True)
    p.add_argument("user_id")
    p = command(users, "revoke-admin", "take global admin rights away", "users_set_admin", False)
    p.add_argument("user_id")

    rotation = group("rotation", "master-key rotation")
    command(rotation, "status", "progress of an ENCRYPTION_KEY_NEW rotation", "rotation_status")
    return parser


def _fail(message: str, code: int, err: TextIO) -> NoReturn:
    err.write(f"lectr: {_inert(message)}\n")
    err.flush()
    raise SystemExit(code)


def _check_url(url: str, err: TextIO) -> None:
    """The admin API URL: http(s)://host[:port][/prefix], with no query,
    no fragment, no space or control character, and no
    credentials (the token goes in LECTR_ADMIN_TOKEN; a password in the URL
    would be repeated by every error message)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        parts, port_ok = None, False
    if parts is not None and (parts.username is not None or parts.password is not None):
        _fail(
            "the admin API URL must not carry credentials: give the token in LECTR_ADMIN_TOKEN",
            EXIT_USAGE,
            err,
        )
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or not port_ok
        or parts.query
        or parts.fragment
        or any(c <= " " or c == "\x7f" for c in url)
    ):
        _fail(f"the admin API URL must be http(s)://host:port, got {url!r}", EXIT_USAGE, err)


def run(
    argv: Sequence[str] | None = None,
    environ: dict[str, str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    stdin: TextIO = sys.stdin,
) -> int:
    environ = dict(os.environ if environ is None else environ)
    args = build_parser().parse_args(argv)
    url = args.url or environ.get("LECTR_ADMIN_URL") or DEFAULT_URL
    _check_url(url, err)
    token, token_file = token_and_file(environ)
    client = Client(url, token, token_file=token_file)
    commands = Commands(client, Output(args.json, out), stdin)
    try:
        getattr(commands, args.handler)(args, *args.handler_extra)
    except CliError as e:
        _fail(e.message, e.exit_code, err)
    except KeyboardInterrupt:
        err.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # e.g. `lectr requests --follow | head`: the reader went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_OK


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
