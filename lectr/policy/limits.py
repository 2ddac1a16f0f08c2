"""Step: limits and budgets (docs/limits.md) - the last step before the
upstream call, so that requests another step refused never count.

The limiter answers from memory (:mod:`lectr.limits`); a request it admits
carries its :class:`~lectr.limits.limiter.Admission` (``call.admission``:
``x-ratelimit-*`` headers on the response, settled exactly once when the
call ends). Dollar budgets reserve the request's worst-case cost, computed
only when a budget applies: the largest over the plan's targets, from the
prompt's size and the request's own output limit (or the model's), times
the completions it asks for (``n``, ``best_of``, each prompt of a batch).
"""

from __future__ import annotations

from lectr.limits.limiter import Refusal as LimitRefusal
from lectr.policy.chain import Refusal
from lectr.pricing.cost import estimate_prompt_tokens

_KINDS = {"rate_limit_exceeded": "rate_limited", "budget_exceeded": "budget_exceeded"}
_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_COMPLETIONS = ("n", "best_of")


def output_limit(doc: dict | None) -> int | None:
    """The output-token limit a request sets, if any."""
    if doc is None:
        return None
    for name in _OUTPUT_LIMITS:
        value = doc.get(name)
        if type(value) is int and value > 0:
            return value
    return None


def completions(doc: dict | None) -> int:
    """How many completions a request has generated (and billed), each up
    to the output limit: OpenAI's ``n``, or the legacy completions'
    ``best_of`` (which generates that many and returns ``n``), for each
    prompt of a legacy completions batch (``prompt``: a list of strings or
    of token-id lists; a list of token ids is one prompt)."""
    if doc is None:
        return 1
    count = 1
    for name in _COMPLETIONS:
        value = doc.get(name)
        if type(value) is int and value > count:
            count = value
    prompt = doc.get("prompt")
    if type(prompt) is list and len(prompt) > 1 and type(prompt[0]) is not int:
        count *= len(prompt)
    return count


class Limits:
    name = "limits"

    def __init__(self, limits, dearest=None) -> None:
        """``dearest(targets, prompt_tokens, max_output_tokens, completions)``
        -> int | None: the pricing catalogue's largest worst case over a
        plan's targets, in whole micro-dollars (None: none is priced; budgets
        then charge the real cost at settlement)."""
        self._admit = limits.admit
        self._limited = limits.limiter.limited_orgs
        self._dearest = dearest

    def __call__(self, call) -> Refusal | None:
        ident = call.ident
        if ident.org_id not in self._limited:
            return None  # no limit on the org or its keys: nothing to admit or settle
        if call.dry_run:
            return None  # an explanation: nothing is reserved
        reserve = self._reserve(call) if self._dearest is not None else None
        result = self._admit(ident.org_id, ident.key_id, reserve_usd=reserve)
        if result.__class__ is LimitRefusal:
            kind = _KINDS.get(result.kind, "unavailable")
            return Refusal(result.status, kind, result.message, tuple(result.headers))
        call.admission = result
        return None

    def _reserve(self, call):
        # (called by the limiter only when a dollar budget applies)
        def worst() -> int | None:
            read = call.read
            facts = read.facts  # (a large body, judged in another process)
            if facts is None:
                limit, n = output_limit(read.doc), completions(read.doc)
            else:
                limit, n = facts.output_limit, facts.completions
            return self._dearest(
                call.plan.targets, estimate_prompt_tokens(len(read.body)), limit, n
            )

        return worst
