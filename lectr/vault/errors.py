"""Errors of the vault. None of their messages ever contains key material:
master keys appear only as fingerprints, provider keys never."""

from __future__ import annotations


class VaultKeyError(Exception):
    """The configured master key(s) cannot open the stored provider keys.
    A start-up failure: the message is one line for the operator."""


class VaultCryptoError(Exception):
    """A sealed provider key could not be opened."""


class UnknownKek(VaultCryptoError):
    """The row names a master key this process does not hold."""


class DecryptionFailed(VaultCryptoError):
    """Authentication failed: wrong key, tampered bytes, or a ciphertext
    moved to another org, provider or record."""
