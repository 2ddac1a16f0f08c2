"""First run with nothing configured: development secrets in the data dir.

Without ``DATABASE_URL`` Lectr runs an embedded PostgreSQL; if no
``ENCRYPTION_KEY`` is given either, a master key is generated into
``<data-dir>/encryption.key`` and an admin token into ``<data-dir>/admin.token``
(both mode 0600). The token is printed once, when it is created.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import stat
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from lectr.config import Config, ConfigError, parse_master_key, parse_token
from lectr.util.files import fsync_dir

ENCRYPTION_KEY_FILE = "encryption.key"
ADMIN_TOKEN_FILE = "admin.token"


def ensure_data_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the data directory {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"the data directory {path} is not writable")


def _read_or_create(path: Path, make: callable) -> tuple[str, bool]:
    """Return (content, created). The value is written whole to a private
    temporary file, flushed to disk, then linked into place: creation is
    atomic and exclusive, so two processes starting together agree on one
    value, and no one (after a crash or a power loss either) ever reads a
    file that exists but is empty or partly written."""
    if not path.exists():
        value = make()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:  # (mkstemp: mode 0600)
                f.write(value + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process got there first
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: create in place
                _write_exclusive(path, value)
        except FileExistsError:
            pass
        else:
            with contextlib.suppress(OSError):  # (not every file system syncs directories)
                fsync_dir(path.parent)
            return value, True
        finally:
            os.unlink(tmp)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(0o600)
    return path.read_text().strip(), False


def _write_exclusive(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_admin_token(data_dir: Path) -> str | None:
    """The development admin token, for the CLI; None when there is none."""
    try:
        return (data_dir / ADMIN_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def apply_development_defaults(config: Config, out: TextIO = sys.stderr) -> Config:
    """Generate what a first run needs. Only in embedded-database mode: with
    ``DATABASE_URL`` set, a missing ``ENCRYPTION_KEY`` is a configuration
    error (checked by :func:`lectr.config.load_config`)."""
    if not config.embedded_database:
        return config
    ensure_data_dir(config.data_dir)
    notes: list[str] = [f"embedded PostgreSQL in {config.data_dir / 'pg'}"]
    changes: dict = {"development_mode": True}

    if config.encryption_key is None:
        key_path = config.data_dir / ENCRYPTION_KEY_FILE
        raw, created = _read_or_create(key_path, lambda: base64.b64encode(os.urandom(32)).decode())
        try:
            changes["encryption_key"] = parse_master_key(raw)
        except ValueError as e:
            raise ConfigError(f"{key_path} is malformed: {e}") from None
        notes.append(f"master key {'generated into' if created else 'read from'} {key_path}")

    token_line = None
    if config.admin_token is None:
        token_path = config.data_dir / ADMIN_TOKEN_FILE
        token, created = _read_or_create(token_path, lambda: "lat_" + secrets.token_urlsafe(32))
        try:  # (as LECTR_ADMIN_TOKEN: an empty file left by an older version is no token)
            changes["admin_token"] = parse_token(token)
        except ValueError as e:
            raise ConfigError(
                f"{token_path} is malformed: {e}; delete it to have a new token generated"
            ) from None
        if created:
            token_line = f"admin token (shown once): {token}"
            notes.append(f"admin token saved in {token_path}")
        else:
            notes.append(f"admin token in {token_path}")

    bar = "*" * 72
    lines = [bar, "  Lectr is running in DEVELOPMENT MODE", *[f"    - {n}" for n in notes]]
    if token_line:
        lines.append(f"    - {token_line}")
    lines += [
        "  For production set DATABASE_URL, ENCRYPTION_KEY and LECTR_ADMIN_TOKEN or OIDC.",
        bar,
    ]
    out.write("\n".join(lines) + "\n")
    out.flush()
    return replace(config, **changes)
