"""Step: a provider key to use - targets whose provider has no key in the
org's pools are dropped; when none is left the request is refused."""

from __future__ import annotations

from lectr.policy.chain import Refusal


class KeyAvailability:
    name = "keys"

    def __init__(self, selector) -> None:
        self._selector = selector

    def __call__(self, call) -> Refusal | None:
        plan = call.plan
        org_id = call.ident.org_id
        has_key = self._selector.has_key
        kept = [t for t in plan.targets if has_key(org_id, t.provider)]
        if not kept:
            provider = self._selector.registry.get(plan.targets[0].provider)
            return Refusal(
                403,
                "permission",
                f"No {provider.display_name} key is configured for this organization.",
            )
        if len(kept) != len(plan.targets):
            plan.targets = kept
        return None
