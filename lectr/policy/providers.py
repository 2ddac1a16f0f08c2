"""Step: the org's provider settings - is each target's provider enabled,
and is its model allowed? Targets that fail are dropped; when none is left
the request is refused with the first reason."""

from __future__ import annotations

from lectr.policy.chain import Refusal


def _shown(model: str) -> str:
    return model if len(model) <= 200 else model[:200] + "…"


class ProviderPolicy:
    name = "providers"

    def __init__(self, settings, registry) -> None:
        self._settings = settings
        self._registry = registry

    def __call__(self, call) -> Refusal | None:
        plan = call.plan
        org_id = call.ident.org_id
        kept = []
        refusal = None
        for target in plan.targets:
            provider = self._registry.get(target.provider)
            if provider is None:
                refusal = refusal or Refusal(
                    403, "permission", f"Provider '{target.provider}' is not available."
                )
                continue
            settings = self._settings.stored(org_id, target.provider)
            if settings is None:  # the defaults: enabled, every model allowed
                kept.append(target)
            elif not settings.enabled:
                refusal = refusal or Refusal(
                    403,
                    "permission",
                    f"{provider.display_name} is disabled for this organization.",
                )
            elif not settings.allows_model(target.model):
                refusal = refusal or Refusal(
                    403,
                    "permission",
                    f"Model '{_shown(target.model)}' is not allowed for this organization.",
                )
            else:
                kept.append(target)
        if not kept:
            return refusal
        if len(kept) != len(plan.targets):
            plan.targets = kept
        return None
