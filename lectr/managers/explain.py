"""``POST /admin/orgs/{id}/routes/explain``: the plan Lectr would follow now
for a request, without calling anyone.

It runs the proxy's own policy chain (the same step objects) on a request
made of the given path, headers and body, then lists the attempts the
attempt loop would make if each one failed: the same code decides, so the
explanation cannot drift from what the proxy does. Nothing is changed: the
round-robin state used is a private copy, and no key is decrypted.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from lectr.errors import BadRequest, NotFound
from lectr.policy.chain import Refusal, run_chain
from lectr.policy.plan import Selector
from lectr.providers.body import BodyRefused, read_body
from lectr.proxy.target import route, target_problem
from lectr.storage.api_keys import KeyIdentity
from lectr.util.validate import parse_uuid

MAX_BODY = 1 << 20
#: failures that move a route to its next target without setting the key aside
_TARGET_FAILURES = ("5xx", "timeout", "connect")


class _Headers:
    """The request headers an explanation is given (lower-case names)."""

    def __init__(self, headers: dict[str, str]) -> None:
        self._items = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    def get(self, name: bytes) -> list[bytes]:
        return [v for k, v in self._items if k == name]

    def first(self, name: bytes) -> bytes | None:
        values = self.get(name)
        return values[0] if values else None

    def __contains__(self, name: bytes) -> bool:
        return any(k == name for k, _ in self._items)

    def __iter__(self):
        return iter(self._items)


class _ExplainedCall:
    """What the policy steps read and set on a call."""

    def __init__(self, ident, entry, headers, read) -> None:
        self.ident = ident
        self.entry = entry
        self.dialect = entry.provider.dialect
        self.api_path_text = entry.api_path.decode("ascii")
        self.headers = headers
        self.read = read
        self.requested_model = None
        self.plan = None
        self.admission = None
        self.dry_run = True  # nothing is reserved or counted


class RouteExplainer:
    def __init__(self, *, orgs, registry, steps, vault, health, selector=None) -> None:
        """``selector``: the proxy's (its round-robin decides which key and
        target a request without a session gets next; explain names the
        same, from a fork that leaves it unchanged)."""
        self._orgs = orgs
        self._registry = registry
        self._steps = steps
        self._vault = vault
        self._health = health
        self._selector = selector

    async def explain(self, org_id: object, body: dict) -> dict:
        org = await self._orgs.get_org(parse_uuid(org_id, "organization"))
        path = body.get("path", "/v1/chat/completions")
        if not isinstance(path, str) or not path.isascii():
            raise BadRequest("path must be a proxy path such as /v1/chat/completions")
        raw_path = path.encode("ascii")
        problem = target_problem(raw_path)
        if problem is not None:
            raise BadRequest(problem)
        headers = body.get("headers") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise BadRequest("headers must be an object of strings")
        request_headers = _Headers(headers)
        entry = route(
            raw_path.partition(b"?")[0], b"anthropic-version" in request_headers, self._registry
        )
        if entry is None:
            raise NotFound(f"{path} is not a proxy route")
        request_body = json.dumps(body.get("body", {})).encode("utf-8")
        if len(request_body) > MAX_BODY:
            raise BadRequest("the body to explain is too large")
        try:
            read = read_body([b"application/json"], request_body)
        except BodyRefused as e:
            return self._refused(entry, Refusal(400, "invalid_request", str(e)))
        ident = KeyIdentity(key_id="", org_id=org.id, org_enabled=org.enabled)
        call = _ExplainedCall(ident, entry, request_headers, read)
        outcome: list = []
        failure: list = []
        run_chain(self._steps, call, outcome.append, failure.append)
        if failure:
            failure[0].raiseException()
        if not outcome:
            raise BadRequest("a policy step did not answer synchronously")
        if outcome[0] is not None:
            return self._refused(entry, outcome[0], call)
        return self._plan(entry, call)

    def _refused(self, entry, refusal: Refusal, call=None) -> dict:
        return {
            "entry": {"provider": entry.provider.name, "api_path": entry.api_path.decode()},
            "model": call.requested_model if call is not None else None,
            "route": None,
            "refusal": {"status": refusal.status, "kind": refusal.kind, "message": refusal.message},
            "attempts": [],
            "keys": [],
        }

    def _plan(self, entry, call) -> dict:
        plan = call.plan
        proxy = self._selector
        selector = (
            proxy.fork()
            if proxy is not None
            else Selector(self._vault, self._health, self._registry)
        )
        org_id = call.ident.org_id
        attempts = []
        attempt = plan.first(selector, org_id)
        while attempt is not None:
            attempts.append(
                {
                    "attempt": attempt.n,
                    "provider": attempt.target.provider,
                    "model": attempt.target.model,
                    "key": {"id": attempt.key.id, "name": attempt.key.name},
                }
            )
            # the next attempt if this one failed with a key failure, when its
            # pool has another key; else the next target, after a failure the
            # route moves on from: a target failure it retries on (the key
            # stays usable for the targets after), or else a key failure (a
            # refused key always moves a route on)
            nxt = plan.another_key(selector, org_id)
            if nxt is None:
                failure = next((f for f in _TARGET_FAILURES if f in plan.retry_on), "refused")
                nxt = plan.next(selector, org_id, None, failure)
            attempt = nxt
        keys = []
        for provider in dict.fromkeys(t.provider for t in plan.targets):  # each pool once
            for key in self._vault.pool(org_id, provider):
                cooldown = self._health.cooldown(key.id)
                keys.append(
                    {
                        "provider": provider,
                        "id": key.id,
                        "name": key.name,
                        "weight": key.weight,
                        "cooldown": None
                        if cooldown is None
                        else {
                            "reason": cooldown.reason,
                            "remaining_seconds": round(self._health.remaining(key.id), 3),
                            "until": datetime.fromtimestamp(
                                cooldown.at + cooldown.seconds, UTC
                            ).isoformat(),
                        },
                    }
                )
        route = plan.route
        return {
            "entry": {"provider": entry.provider.name, "api_path": entry.api_path.decode()},
            "model": call.requested_model,
            "route": None
            if route is None
            else {
                "name": route.name,
                "strategy": route.strategy,
                "retry_on": sorted(route.retry_on),
                "max_attempts": route.max_attempts,
                "attempt_timeout": route.attempt_timeout,
            },
            "refusal": None,
            "attempts": attempts,
            "keys": keys,
        }
