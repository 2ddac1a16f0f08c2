"""Envelope encryption (lectr.vault.crypto): round trips, tamper detection,
associated-data binding, nonce uniqueness, fingerprints, rewrapping."""

from __future__ import annotations

import base64
import os
import uuid
from dataclasses import replace

import pytest

from lectr.util.secret import Secret
from lectr.vault.crypto import (
    NONCE_BYTES,
    TAG_BYTES,
    Binding,
    Kek,
    Keyring,
    Prepared,
    Sealed,
    kek_fingerprint,
)
from lectr.vault.errors import DecryptionFailed, UnknownKek

KEY = b"sk-test-0123456789abcdefghijklmnopqrstuvwxyz-ABCD"


def new_kek() -> Secret[bytes]:
    return Secret(os.urandom(32))


def binding(org: str | None = None, provider: str = "openai", record: str | None = None):
    return Binding(org or str(uuid.uuid4()), provider, record or str(uuid.uuid4()))


@pytest.fixture
def ring() -> Keyring:
    return Keyring(new_kek())


def test_round_trip(ring):
    b = binding()
    sealed = ring.seal(b, KEY)
    assert ring.open(b, sealed) == KEY
    assert KEY not in sealed.ciphertext and KEY not in sealed.wrapped_dek
    assert len(sealed.nonce) == len(sealed.dek_nonce) == NONCE_BYTES
    assert len(sealed.ciphertext) == len(KEY) + TAG_BYTES
    assert len(sealed.wrapped_dek) == 32 + TAG_BYTES
    assert sealed.kek_id == ring.current.fingerprint


def test_repr_shows_no_bytes(ring):
    sealed = ring.seal(binding(), KEY)
    text = repr(sealed)
    assert sealed.ciphertext.hex() not in text and repr(sealed.ciphertext) not in text
    assert sealed.kek_id in text
    assert "<Kek " in repr(ring.current)


def _damaged(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


def test_a_prepared_key_keeps_its_data_key_but_decrypts_the_key_every_time(ring):
    b = binding()
    p = Prepared(b, ring.seal(b, KEY))
    assert ring.open_prepared(p) == KEY
    assert ring.open_prepared(p) == KEY
    # the data key is kept: a second open needs no master key any more...
    assert Keyring(new_kek()).open_prepared(p) == KEY
    # ...but the provider key itself is decrypted on every open, never kept
    p.ciphertext = _damaged(p.ciphertext)
    with pytest.raises(DecryptionFailed):
        ring.open_prepared(p)


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "wrapped_dek", "dek_nonce"])
def test_a_data_key_is_kept_only_once_it_opened_its_key(ring, field):
    b = binding()
    sealed = ring.seal(b, KEY)
    p = Prepared(b, replace(sealed, **{field: _damaged(getattr(sealed, field))}))
    for _ in range(2):
        with pytest.raises(DecryptionFailed):
            ring.open_prepared(p)
    # nothing was kept: without the master key it cannot even be tried
    with pytest.raises(UnknownKek):
        Keyring(new_kek()).open_prepared(p)


def _flips(data: bytes):
    """Every other value of every single byte."""
    for i in range(len(data)):
        for mask in range(1, 256):
            yield data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "wrapped_dek", "dek_nonce"])
def test_every_single_byte_flip_is_rejected(ring, field):
    """Covers the GCM tags too: the last 16 bytes of ciphertext and wrapped_dek."""
    b = binding()
    sealed = ring.seal(b, KEY)
    original = getattr(sealed, field)
    count = 0
    for flipped in _flips(original):
        with pytest.raises(DecryptionFailed):
            ring.open(b, replace(sealed, **{field: flipped}))
        count += 1
    assert count == 255 * len(original)
    assert ring.open(b, sealed) == KEY  # the original is still fine


@pytest.mark.parametrize("field", ["ciphertext", "wrapped_dek"])
def test_truncated_or_extended_bytes_are_rejected(ring, field):
    b = binding()
    sealed = ring.seal(b, KEY)
    original = getattr(sealed, field)
    for bad in (original[:-1], original + b"\x00", b"", original[:TAG_BYTES]):
        with pytest.raises(DecryptionFailed):
            ring.open(b, replace(sealed, **{field: bad}))


def test_bad_nonce_lengths_are_rejected(ring):
    b = binding()
    sealed = ring.seal(b, KEY)
    for field in ("nonce", "dek_nonce"):
        for bad in (b"", b"\x00" * 11, b"\x00" * 13):
            with pytest.raises(DecryptionFailed):
                ring.open(b, replace(sealed, **{field: bad}))


def test_ciphertext_moved_to_another_org_provider_or_record_is_rejected(ring):
    b = binding()
    sealed = ring.seal(b, KEY)
    for moved in (
        replace(b, org_id=str(uuid.uuid4())),
        replace(b, provider="anthropic"),
        replace(b, record_id=str(uuid.uuid4())),
        Binding(b.provider, b.org_id, b.record_id),  # fields swapped
    ):
        with pytest.raises(DecryptionFailed):
            ring.open(moved, sealed)


def test_parts_of_two_rows_do_not_mix(ring):
    """Splicing the wrapped DEK of one row into another fails."""
    org = str(uuid.uuid4())
    b1, b2 = binding(org), binding(org)
    s1, s2 = ring.seal(b1, KEY), ring.seal(b2, b"sk-other-key-0000")
    with pytest.raises(DecryptionFailed):
        ring.open(b1, replace(s1, wrapped_dek=s2.wrapped_dek, dek_nonce=s2.dek_nonce))
    with pytest.raises(DecryptionFailed):
        ring.open(b1, replace(s1, ciphertext=s2.ciphertext, nonce=s2.nonce))


def test_wrong_master_key_and_unknown_master_key(ring):
    b = binding()
    sealed = ring.seal(b, KEY)
    other = Keyring(new_kek())
    with pytest.raises(UnknownKek):
        other.open(b, sealed)
    # a row that claims the other ring's fingerprint still fails to authenticate
    with pytest.raises(DecryptionFailed):
        other.open(b, replace(sealed, kek_id=other.current.fingerprint))
    assert not other.can_unwrap(b, sealed)
    assert ring.can_unwrap(b, sealed)


def test_nonces_and_data_keys_are_unique_over_many_encryptions(ring):
    n = 20_000
    b = binding()
    nonces, dek_nonces, wrapped, ciphertexts = set(), set(), set(), set()
    for _ in range(n):
        s = ring.seal(b, KEY)
        nonces.add(s.nonce)
        dek_nonces.add(s.dek_nonce)
        wrapped.add(s.wrapped_dek)
        ciphertexts.add(s.ciphertext)
    assert len(nonces) == len(dek_nonces) == len(wrapped) == len(ciphertexts) == n
    assert not nonces & dek_nonces


def test_fingerprint_is_stable_distinct_and_reveals_nothing():
    key = os.urandom(32)
    fp = kek_fingerprint(key)
    assert fp == kek_fingerprint(key) == Kek(Secret(key)).fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp != kek_fingerprint(os.urandom(32))
    for form in (key.hex(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()):
        assert fp not in form and form[:8] not in fp
    # not a plain hash of the key either
    import hashlib

    assert fp not in hashlib.sha256(key).hexdigest()


def test_keyring_rules():
    k = new_kek()
    with pytest.raises(ValueError):
        Keyring(k, Secret(k.reveal()))
    with pytest.raises(ValueError):
        Kek(Secret(b"short"))
    new = new_kek()
    ring = Keyring(k, new)
    assert ring.write_kek is ring.next
    assert ring.fingerprints == {kek_fingerprint(k.reveal()), kek_fingerprint(new.reveal())}


def test_rewrap_moves_only_the_dek():
    old, new = new_kek(), new_kek()
    before = Keyring(old)
    b = binding()
    sealed = before.seal(b, KEY)
    during = Keyring(old, new)
    rewrapped = during.rewrap(b, sealed)
    assert rewrapped.kek_id == during.next.fingerprint != sealed.kek_id
    assert (rewrapped.ciphertext, rewrapped.nonce) == (sealed.ciphertext, sealed.nonce)
    assert rewrapped.wrapped_dek != sealed.wrapped_dek
    assert rewrapped.dek_nonce != sealed.dek_nonce
    # both keys open either form during the rotation; only the new one after
    assert during.open(b, sealed) == during.open(b, rewrapped) == KEY
    after = Keyring(new)
    assert after.open(b, rewrapped) == KEY
    with pytest.raises(UnknownKek):
        after.open(b, sealed)
    # rewrapping is bound like sealing
    with pytest.raises(DecryptionFailed):
        during.rewrap(replace(b, org_id=str(uuid.uuid4())), sealed)


def test_seal_with_new_key_during_rotation():
    old, new = new_kek(), new_kek()
    ring = Keyring(old, new)
    sealed = ring.seal(binding(), KEY)
    assert sealed.kek_id == kek_fingerprint(new.reveal())


def test_sealed_is_a_value():
    s = Sealed(b"a", b"b", b"c", b"d", "e")
    assert s == Sealed(b"a", b"b", b"c", b"d", "e")
