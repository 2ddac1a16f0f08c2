"""Step: the org's kill switch."""

from __future__ import annotations

from lectr.policy.chain import Refusal

DISABLED = Refusal(403, "permission", "This organization is disabled.")


class OrgEnabled:
    name = "org"

    def __call__(self, call) -> Refusal | None:
        return None if call.ident.org_enabled else DISABLED
