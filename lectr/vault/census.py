"""Which master keys the running nodes hold, over LISTEN/NOTIFY (no table).

A rotation must not rewrap a DEK to ``ENCRYPTION_KEY_NEW`` while some node
still runs without that key: the node would load the rewrapped row and fail
to decrypt it. So every vault takes part in a small census on the
``vault_census`` notification kind:

- ``node <id> <fp>,<fp>``: a node says which key fingerprints it holds (when
  it starts, and in answer to a probe);
- ``probe``: a rotating node asks every node to say it again;
- ``bye <id>``: a node stops.

A rotating node rewraps only while no node heard from within ``ttl``
seconds lacks the new key (:meth:`Census.lacking`). A node that cannot read
the new key and starts after some rows were rewrapped refuses to start (the
vault's start-up check), so it never serves requests with missing keys.

Messages carry node ids and key fingerprints only, never key material.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

KIND = "vault_census"


class Census:
    _log = Logger()

    def __init__(
        self,
        fingerprints: frozenset[str],
        send: Callable[[str, str], Awaitable[None]],
        *,
        reactor,
        node_id: str | None = None,
    ) -> None:
        self.node_id = node_id or uuid.uuid4().hex
        self._fingerprints = fingerprints
        self._send = send
        self._reactor = reactor
        # node id -> (fingerprints it holds, when it was last heard from)
        self._peers: dict[str, tuple[frozenset[str], float]] = {}
        self._active = False

    def subscribe(self, listener) -> None:
        listener.subscribe(KIND, self._on_message)
        self._active = True

    def close(self) -> None:
        self._active = False

    # --- sending ----------------------------------------------------------------

    async def announce(self) -> None:
        fps = ",".join(sorted(self._fingerprints))
        await self._send(KIND, f"node {self.node_id} {fps}")

    async def probe(self) -> None:
        await self._send(KIND, "probe")

    async def goodbye(self) -> None:
        await self._send(KIND, f"bye {self.node_id}")

    # --- receiving ----------------------------------------------------------------

    def _on_message(self, ident: str) -> None:
        if not self._active:
            return
        word, _, rest = ident.partition(" ")
        if word == "probe":
            d = ensureDeferred(self.announce())
            d.addErrback(
                lambda f: self._log.warn(
                    "vault census: could not answer a probe ({error})", error=str(f.value)
                )
            )
        elif word == "node":
            node_id, _, fps = rest.partition(" ")
            if node_id:
                held = frozenset(fp for fp in fps.split(",") if fp)
                self._peers[node_id] = (held, self._reactor.seconds())
        elif word == "bye":
            self._peers.pop(rest, None)

    def lacking(self, fingerprint: str, ttl: float) -> list[str]:
        """Ids of the nodes heard from within ``ttl`` seconds that do not
        hold ``fingerprint``."""
        horizon = self._reactor.seconds() - ttl
        for node_id in [n for n, (_, seen) in self._peers.items() if seen < horizon]:
            del self._peers[node_id]
        return sorted(n for n, (held, _) in self._peers.items() if fingerprint not in held)

    @property
    def peers(self) -> dict[str, frozenset[str]]:
        return {n: held for n, (held, _) in self._peers.items()}
