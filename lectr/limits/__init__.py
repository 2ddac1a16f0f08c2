"""Limits and budgets per org and per Lectr key, enforced across every node
(docs/limits.md). The proxy calls :meth:`LimitsManager.admit` once per
request and :meth:`Admission.settle` once when it ends."""

from lectr.limits.limiter import NO_LIMITS, Admission, Refusal
from lectr.limits.manager import LimitsManager, LimitsView
from lectr.limits.model import Limits

__all__ = ["NO_LIMITS", "Admission", "Limits", "LimitsManager", "LimitsView", "Refusal"]
