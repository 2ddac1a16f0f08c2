"""The dashboard's files, read once from the package at start-up and kept
in memory (about 100 kB): a request never touches the file system, and an
unknown name is simply absent.

They are served under ``/ui/<version>/``, where the version is a hash of
their content, so they can be cached for a year; ``index.html`` (never
cached) names the current version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

INDEX = "index.html"
#: replaced in index.html by ``/ui/<version>``
BASE_PLACEHOLDER = "%BASE%"
#: replaced in index.html by one modulepreload link per module
PRELOAD_PLACEHOLDER = "%PRELOAD%"

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".txt": b"text/plain; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: bytes


def _walk(folder: Traversable, prefix: str = ""):
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk(entry, f"{prefix}{entry.name}/")
        else:
            yield f"{prefix}{entry.name}", entry.read_bytes()


def _content_type(name: str) -> bytes | None:
    dot = name.rfind(".")
    return CONTENT_TYPES.get(name[dot:]) if dot >= 0 else None


class Assets:
    def __init__(self, sources: dict[str, bytes]) -> None:
        if INDEX not in sources:
            raise ValueError("the dashboard has no index.html")
        self._files: dict[str, Asset] = {}
        digest = hashlib.sha256()
        for name in sorted(sources):
            content_type = _content_type(name)
            if content_type is None:
                continue  # not served
            body = sources[name]
            digest.update(name.encode() + b"\0" + hashlib.sha256(body).digest())
            if name != INDEX:
                self._files[name] = Asset(body, content_type)
        self.version = digest.hexdigest()[:16]
        self.base = f"/ui/{self.version}"
        modules = sorted(n for n in self._files if n.endswith(".js"))
        preload = "\n    ".join(
            f'<link rel="modulepreload" href="{self.base}/{name}">' for name in modules
        )
        html = sources[INDEX].decode("utf-8")
        self.index = Asset(
            html.replace(PRELOAD_PLACEHOLDER, preload)
            .replace(BASE_PLACEHOLDER, self.base)
            .encode(),
            CONTENT_TYPES[".html"],
        )

    @classmethod
    def load(cls) -> Assets:
        """The files shipped in the package (``lectr/dashboard/static``)."""
        return cls(dict(_walk(files("lectr.dashboard") / "static")))

    def get(self, version: str, name: str) -> Asset | None:
        if version != self.version:
            return None
        return self._files.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._files)

    def size(self, names=None) -> int:
        """Bytes of the named files (default: all), uncompressed."""
        chosen = self._files if names is None else {n: self._files[n] for n in names}
        return sum(len(a.body) for a in chosen.values()) + len(self.index.body)
