"""Small file-system helpers."""

from __future__ import annotations

import errno
import os
from pathlib import Path

#: what a file system that cannot sync a directory answers (some FUSE and
#: network mounts): nothing to do there, the files themselves are synced
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def fsync_dir(directory: Path) -> None:
    """Flush ``directory``'s entries to disk, so that a file just created or
    renamed in it keeps its name after a power loss. A file system that
    cannot sync a directory is no error; any other failure (EIO) raises
    OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)
