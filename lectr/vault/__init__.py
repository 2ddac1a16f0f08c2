"""The BYOK vault: envelope encryption of provider keys, master-key (KEK)
fingerprints and rotation. The manager that uses it is
:mod:`lectr.managers.vault`; docs/security.md describes the scheme."""
