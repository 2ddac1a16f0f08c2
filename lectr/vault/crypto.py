"""Envelope encryption of provider keys (AES-256-GCM, ``cryptography``).

Each stored key gets a fresh random 256-bit data key (DEK). The DEK encrypts
the provider key; the master key (KEK, ``ENCRYPTION_KEY``) encrypts ("wraps")
the DEK. Both encryptions use a random 96-bit nonce and associated data that
binds them to the row's org id, provider and record id, under distinct labels,
so a ciphertext or wrapped DEK copied to another org, provider or row (or
from one role to the other) fails authentication. The wrapped DEK is also
bound to the key's own options (``base_url``, ``api_version``): a row pointed
at another host in the database no longer opens, so the key is never sent
there. Rows wrapped before that (``wrapped-dek/v1``) open only when the vault
says their options are ones an admin could have given (``Binding.legacy``);
a master-key rotation rewraps them bound.

Rows name the KEK that wrapped their DEK by a fingerprint: an HMAC-SHA-256 of
a fixed label keyed with the KEK, truncated to 64 bits. It identifies a key
without revealing anything about it. Rotating the KEK only rewraps DEKs
(:meth:`Keyring.rewrap`); the provider-key ciphertext never changes.

Everything here is pure computation on bytes: no I/O, no reactor. Opening a
key costs two AES-GCM decryptions of a few dozen bytes (see
bench/vault_bench.py), cheap enough to run per request on the reactor.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lectr.util.secret import Secret
from lectr.vault.errors import DecryptionFailed, UnknownKek

KEY_BYTES = 32  # AES-256, for KEKs and DEKs
NONCE_BYTES = 12  # 96-bit GCM nonces, random per encryption
TAG_BYTES = 16  # GCM appends a 128-bit tag to every ciphertext

_FINGERPRINT_LABEL = b"lectr/kek-fingerprint/v1"
_KEY_AD_LABEL = b"lectr/provider-key/v1"
_DEK_AD_LABEL = b"lectr/wrapped-dek/v2"  # v1 did not bind base_url, api_version
_LEGACY_DEK_AD_LABEL = b"lectr/wrapped-dek/v1"
FINGERPRINT_HEX_CHARS = 16


def kek_fingerprint(key: bytes) -> str:
    """The public name of a master key: 16 hex digits of
    HMAC-SHA-256(key, label). HMAC is a PRF keyed by the KEK, so the name
    reveals nothing about the key and cannot be computed without it."""
    digest = hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()
    return digest[:FINGERPRINT_HEX_CHARS]


def _field(raw: bytes) -> bytes:
    """``raw`` with its length in front: 2 bytes, or for 65,535 bytes and
    more (never sealed: Lectr's own values are far shorter) 0xFFFF and 8
    bytes. Such a value written into the database then fails
    authentication like any other change, instead of raising OverflowError
    at start-up, on the proxy's path and in every rewrap batch."""
    n = len(raw)
    if n < 0xFFFF:
        return n.to_bytes(2, "big") + raw
    return b"\xff\xff" + n.to_bytes(8, "big") + raw


def _option(value: str | None) -> bytes:
    # None and "" must differ: a presence byte, then the length-prefixed text
    if value is None:
        return b"\x00"
    return b"\x01" + _field(value.encode())


@dataclass(frozen=True, slots=True)
class Binding:
    """What a sealed key belongs to; bound into both associated data (the
    key's options into the wrapped DEK's only: the ciphertext never changes).

    ``legacy``: also accept a DEK wrapped before the options were bound
    (``wrapped-dek/v1``). The vault sets it only when the row's options are
    ones an org admin could have given anyway."""

    org_id: str
    provider: str
    record_id: str
    base_url: str | None = None
    api_version: str | None = None
    legacy: bool = False

    def _ad(self, label: bytes) -> bytes:
        # length-prefixed fields: no two different bindings encode the same
        out = bytearray()
        for part in (label, self.org_id.encode(), self.provider.encode(), self.record_id.encode()):
            out += _field(part)
        return bytes(out)

    def key_ad(self) -> bytes:
        return self._ad(_KEY_AD_LABEL)

    def dek_ad(self) -> bytes:
        return self._ad(_DEK_AD_LABEL) + _option(self.base_url) + _option(self.api_version)

    def legacy_dek_ad(self) -> bytes | None:
        """The associated data of a v1 wrapping, when this binding accepts one."""
        return self._ad(_LEGACY_DEK_AD_LABEL) if self.legacy else None


@dataclass(frozen=True, slots=True)
class Sealed:
    """The stored form of one provider key (the crypto columns of a
    ``provider_keys`` row). Each ciphertext carries its 16-byte GCM tag at
    the end, as ``AESGCM.encrypt`` returns it."""

    ciphertext: bytes
    nonce: bytes
    wrapped_dek: bytes
    dek_nonce: bytes
    kek_id: str

    def __repr__(self) -> str:
        return f"Sealed(kek_id={self.kek_id!r}, {len(self.ciphertext)} ciphertext bytes)"


class Prepared:
    """A sealed key with its associated data computed once (they are not
    secret), so that opening it on the hot path allocates nothing else.

    Once it has opened, it keeps its data key's AES-GCM context: the next
    opens skip unwrapping the DEK and setting up its key schedule (2.6 of
    3.6 µs). The plaintext provider key is still decrypted for each attempt
    and never kept. Keeping the DEK gives a reader of the process's memory
    nothing it does not already have: the master key and every wrapped DEK
    and ciphertext are in the same memory for the process's life."""

    __slots__ = (
        "kek_id",
        "wrapped_dek",
        "dek_nonce",
        "dek_ad",
        "legacy_dek_ad",
        "nonce",
        "ciphertext",
        "key_ad",
        "_data_aead",
    )

    def __init__(self, binding: Binding, sealed: Sealed) -> None:
        self.kek_id = sealed.kek_id
        self.wrapped_dek = sealed.wrapped_dek
        self.dek_nonce = sealed.dek_nonce
        self.dek_ad = binding.dek_ad()
        self.legacy_dek_ad = binding.legacy_dek_ad()
        self.nonce = sealed.nonce
        self.ciphertext = sealed.ciphertext
        self.key_ad = binding.key_ad()
        self._data_aead: AESGCM | None = None

    def __repr__(self) -> str:
        return f"<Prepared kek_id={self.kek_id}>"


class Kek:
    """One master key, ready to wrap and unwrap DEKs."""

    __slots__ = ("fingerprint", "_aead")

    def __init__(self, key: Secret[bytes]) -> None:
        raw = key.reveal()
        if len(raw) != KEY_BYTES:
            raise ValueError(f"a master key is {KEY_BYTES} bytes")
        self.fingerprint = kek_fingerprint(raw)
        self._aead = AESGCM(raw)

    def wrap(self, dek: bytes, binding: Binding) -> tuple[bytes, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        return self._aead.encrypt(nonce, dek, binding.dek_ad()), nonce

    def unwrap(self, wrapped: bytes, nonce: bytes, binding: Binding) -> bytes:
        return self.unwrap_with_ad(wrapped, nonce, binding.dek_ad(), binding.legacy_dek_ad())

    def unwrap_with_ad(
        self, wrapped: bytes, nonce: bytes, dek_ad: bytes, legacy_ad: bytes | None = None
    ) -> bytes:
        """:meth:`unwrap` with the binding's associated data already computed."""
        try:
            dek = self._aead.decrypt(nonce, wrapped, dek_ad)
        except (InvalidTag, ValueError):
            # ValueError: a nonce of the wrong length (a damaged row)
            if legacy_ad is None:
                raise DecryptionFailed("the data key does not unwrap") from None
            try:
                dek = self._aead.decrypt(nonce, wrapped, legacy_ad)
            except (InvalidTag, ValueError):
                raise DecryptionFailed("the data key does not unwrap") from None
        if len(dek) != KEY_BYTES:
            raise DecryptionFailed("the data key has the wrong length")
        return dek

    def __repr__(self) -> str:
        return f"<Kek {self.fingerprint}>"


class Keyring:
    """The master keys of this process: ``ENCRYPTION_KEY`` and, during a
    rotation, ``ENCRYPTION_KEY_NEW``. Rows wrapped by either open; new rows
    are wrapped by the new key when there is one."""

    def __init__(self, current: Secret[bytes], new: Secret[bytes] | None = None) -> None:
        self.current = Kek(current)
        self.next = Kek(new) if new is not None else None
        if self.next is not None and self.next.fingerprint == self.current.fingerprint:
            raise ValueError("ENCRYPTION_KEY_NEW is the same key as ENCRYPTION_KEY")
        self._by_id = {k.fingerprint: k for k in (self.current, self.next) if k is not None}

    @property
    def write_kek(self) -> Kek:
        """The key new rows (and rewrapped rows) use."""
        return self.next or self.current

    @property
    def fingerprints(self) -> frozenset[str]:
        return frozenset(self._by_id)

    def get(self, kek_id: str) -> Kek | None:
        return self._by_id.get(kek_id)

    def _kek(self, kek_id: str) -> Kek:
        kek = self._by_id.get(kek_id)
        if kek is None:
            raise UnknownKek(f"wrapped by master key {kek_id}, which this process does not hold")
        return kek

    def seal(self, binding: Binding, plaintext: bytes, kek: Kek | None = None) -> Sealed:
        """Encrypt ``plaintext`` under a fresh DEK wrapped by ``kek`` (default:
        the write key)."""
        dek = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(dek).encrypt(nonce, plaintext, binding.key_ad())
        kek = kek or self.write_kek
        wrapped, dek_nonce = kek.wrap(dek, binding)
        return Sealed(ciphertext, nonce, wrapped, dek_nonce, kek.fingerprint)

    def open(self, binding: Binding, sealed: Sealed) -> bytes:
        """The plaintext, or :class:`DecryptionFailed` / :class:`UnknownKek`."""
        dek = self._kek(sealed.kek_id).unwrap(sealed.wrapped_dek, sealed.dek_nonce, binding)
        try:
            return AESGCM(dek).decrypt(sealed.nonce, sealed.ciphertext, binding.key_ad())
        except (InvalidTag, ValueError):
            raise DecryptionFailed("the provider key does not decrypt") from None

    def open_prepared(self, p: Prepared) -> bytes:
        """:meth:`open` for a :class:`Prepared` key (the proxy's hot path).
        Its data key is unwrapped on the first successful open only."""
        aead = p._data_aead
        if aead is None:
            kek = self._kek(p.kek_id)
            aead = AESGCM(kek.unwrap_with_ad(p.wrapped_dek, p.dek_nonce, p.dek_ad, p.legacy_dek_ad))
        try:
            plaintext = aead.decrypt(p.nonce, p.ciphertext, p.key_ad)
        except (InvalidTag, ValueError):
            raise DecryptionFailed("the provider key does not decrypt") from None
        p._data_aead = aead  # (only a data key that opened its key is kept)
        return plaintext

    def can_unwrap(self, binding: Binding, sealed: Sealed) -> bool:
        """Whether the row's DEK unwraps (the master-key check at start-up)."""
        try:
            self._kek(sealed.kek_id).unwrap(sealed.wrapped_dek, sealed.dek_nonce, binding)
        except (DecryptionFailed, UnknownKek):
            return False
        return True

    def rewrap(self, binding: Binding, sealed: Sealed, to: Kek | None = None) -> Sealed:
        """The same sealed key with its DEK wrapped by ``to`` (default: the
        write key) under a fresh nonce, bound to ``binding`` as it is now (a
        legacy v1 wrapping comes out v2). The provider-key ciphertext and its
        nonce are kept as they are: rotation never re-encrypts keys."""
        target = to or self.write_kek
        dek = self._kek(sealed.kek_id).unwrap(sealed.wrapped_dek, sealed.dek_nonce, binding)
        wrapped, dek_nonce = target.wrap(dek, binding)
        return Sealed(sealed.ciphertext, sealed.nonce, wrapped, dek_nonce, target.fingerprint)
