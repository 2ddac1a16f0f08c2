"""Step: route resolution - which targets (provider, model) a request may go
to.

- the model names one of the org's routes: the route's targets (they must
  speak the client's dialect: Lectr does not translate);
- on the bare ``/v1`` root, ``"<provider>/<model>"`` names a provider of the
  catalogue: that provider, with the bare model;
- otherwise: the provider of the path, with the request's own model.
"""

from __future__ import annotations

from functools import partial

from lectr.managers.routes import Target
from lectr.policy.chain import Refusal
from lectr.policy.plan import RoutingPlan, request_affinity


class ResolveRoute:
    name = "route"

    def __init__(self, routes, registry) -> None:
        self._routes = routes
        self._registry = registry

    def __call__(self, call) -> Refusal | None:
        entry = call.entry
        provider = entry.provider
        model = call.read.model
        if model is None:
            model = provider.model_in_path(call.api_path_text)
        call.requested_model = model
        org_id = call.ident.org_id
        route = None
        if model is not None and self._routes.has_routes(org_id):
            route = self._routes.get(org_id, model)
        if route is not None:
            # (every target speaks one dialect: the first this node knows
            # tells it, a provider not known here is dropped by the next step)
            get = self._registry.get
            target_provider = None
            for t in route.targets:
                target_provider = get(t.provider)
                if target_provider is not None:
                    break
            if target_provider is not None and target_provider.dialect is not call.dialect:
                return Refusal(
                    400,
                    "invalid_request",
                    f"Route '{route.name}' sends {target_provider.dialect.title}-style "
                    f"requests; call it through an {target_provider.dialect.title}-style "
                    "path, not this one.",
                )
            targets = list(route.targets)
        elif entry.auto and model is not None and "/" in model:
            prefix, _, bare = model.partition("/")
            named = self._registry.get(prefix)
            if named is not None and bare:
                if named.dialect is not call.dialect:
                    return Refusal(
                        400,
                        "invalid_request",
                        f"{named.display_name} speaks the {named.dialect.title} API; send "
                        f"'{prefix}/…' models in {named.dialect.title}-style requests, not in "
                        f"{call.dialect.title}-style ones.",
                    )
                targets = [Target(named.name, bare)]
            else:
                targets = [Target(provider.name, model)]
        else:
            targets = [Target(provider.name, model)]
        read = call.read
        if read.doc is None and read.model_span is None and model is not None:
            # a body whose model Lectr cannot rewrite in place (a URL-encoded
            # form): only the targets that keep the client's model
            kept = [t for t in targets if t.model == model]
            if not kept:
                return Refusal(
                    400,
                    "invalid_request",
                    f"'{model[:200]}' sends the request to another model, which needs a JSON "
                    "or multipart body; this body's model cannot be rewritten.",
                )
            targets = kept
        # (what the plan may ask for later, not the call itself: nothing a
        # call owns refers back to it, so that a finished call is freed at
        # once rather than by the cyclic collector - tests/test_request_cycles.py)
        affinity = partial(request_affinity, call.headers, call.dialect, read)
        call.plan = RoutingPlan(route, targets, affinity)
        return None
