"""The spill journal: usage rows that could not be written to PostgreSQL,
kept on disk until they can be.

Append-only segment files in ``<data-dir>/usage-spill/``, one JSON array per
line after a one-line header. Every method here blocks (file I/O, fsync) and
is meant to run in a thread; a lock makes the methods safe to call from
several threads.

Several processes may share the directory (``--workers``): each writes its own
segments and holds an exclusive ``flock`` on the one it is writing; a replay
claims a segment by taking the same lock without waiting, so a segment is
never replayed while it is written, nor by two processes at once, and a
crashed process's locks vanish with it. Replaying twice is harmless anyway:
``request_id`` is unique and inserts skip rows already stored.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from twisted.logger import Logger

from lectr.pricing.cost import Basis, Priced, basis_id, format_usd
from lectr.usage.model import Usage, UsageRecord
from lectr.util.files import fsync_dir

FORMAT_VERSION = 1
_HEADER = (json.dumps({"lectr_usage_spill": FORMAT_VERSION}) + "\n").encode()
_SUFFIX = ".jsonl"
_PREFIX = "spill-"
_TMP_PREFIX = ".unborn-"  # a segment being made (see SpillJournal._open_segment)

_log = Logger()


def _extras(r: UsageRecord) -> dict:
    """What a row carries beyond the first 19 columns (only what is set)."""
    u = r.usage
    extras: dict = {}
    for key, value in (
        ("reasoning_tokens", u.reasoning_tokens),
        ("cache_creation_1h_tokens", u.cache_creation_1h_tokens),
        ("service_tier", u.service_tier),
        ("web_search_requests", u.web_search_requests),
        ("raw", u.raw),
        ("response_model", u.model),
        ("request_bytes", r.request_bytes or None),
        ("cost_usd", format_usd(r.cost_usd)),
        ("route", r.route),
        ("provider_key_id", r.provider_key_id),
        ("attempts", None if r.attempts == 1 else r.attempts),
        ("fallbacks", list(r.fallbacks) or None),
    ):
        if value is not None:
            extras[key] = value
    p = r.pricing
    if p is not None:
        extras["pricing"] = {
            "cost_usd": format_usd(p.cost_usd),
            "estimated": p.estimated,
            "basis": p.basis.json if p.basis is not None else None,
            "prompt_estimate": p.prompt_estimate,
            "reason": p.reason,
        }
    return extras


def _decimal(value: object) -> Decimal | None:
    if not isinstance(value, str):
        return None
    try:
        return Decimal(value)
    except ArithmeticError:  # InvalidOperation
        raise ValueError("not a usage row") from None


def _priced(doc: object) -> Priced | None:
    if not isinstance(doc, dict):
        return None
    basis = doc.get("basis")
    cost = doc.get("cost_usd")
    return Priced(
        _decimal(cost),
        doc.get("estimated") is True,
        Basis(basis_id(basis), basis) if isinstance(basis, str) else None,
        None,
        doc.get("prompt_estimate") if type(doc.get("prompt_estimate")) is int else None,
        doc.get("reason") if isinstance(doc.get("reason"), str) else None,
    )


def encode_record(r: UsageRecord) -> bytes:
    u = r.usage
    row = [
        r.request_id,
        r.created_at.isoformat(),
        r.org_id,
        r.key_id,
        r.provider,
        r.model,
        r.method,
        r.path,
        r.status,
        r.latency_ms,
        r.ttfb_ms,
        r.streamed,
        u.prompt_tokens,
        u.completion_tokens,
        u.total_tokens,
        u.cached_tokens,
        u.cache_creation_tokens,
        u.source,
        r.error_type,
    ]
    extras = _extras(r)
    if extras:  # (a row of 19 columns is the format of earlier versions)
        row.append(extras)
    # ASCII output: any string (lone surrogates, NULs) survives the round trip
    return (json.dumps(row, separators=(",", ":")) + "\n").encode("ascii")


def decode_record(line: bytes) -> UsageRecord:
    row = json.loads(line)
    if not isinstance(row, list) or len(row) not in (19, 20):
        raise ValueError("not a usage row")
    (rid, created, org, key, provider, model, method, path, status, latency, ttfb, streamed) = row[
        :12
    ]
    extras = row[19] if len(row) == 20 else {}
    if not isinstance(extras, dict):
        raise ValueError("not a usage row")
    usage = Usage(
        row[12],
        row[13],
        row[14],
        row[15],
        row[16],
        row[17],
        reasoning_tokens=extras.get("reasoning_tokens"),
        cache_creation_1h_tokens=extras.get("cache_creation_1h_tokens"),
        service_tier=extras.get("service_tier"),
        web_search_requests=extras.get("web_search_requests"),
        raw=extras.get("raw"),
        model=extras.get("response_model"),
    )
    cost = extras.get("cost_usd")
    return UsageRecord(
        request_id=rid,
        created_at=datetime.fromisoformat(created),
        org_id=org,
        key_id=key,
        provider=provider,
        model=model,
        method=method,
        path=path,
        status=status,
        latency_ms=latency,
        ttfb_ms=ttfb,
        streamed=streamed,
        usage=usage,
        error_type=row[18],
        request_bytes=extras.get("request_bytes") or 0,
        cost_usd=_decimal(cost),
        # a row of an older journal has no price: the recorder prices it
        pricing=_priced(extras.get("pricing")),
        route=extras.get("route"),
        provider_key_id=extras.get("provider_key_id"),
        attempts=extras.get("attempts", 1),
        fallbacks=tuple(extras.get("fallbacks") or ()),
    )


@dataclass
class AppendResult:
    written: int  # rows now on disk
    dropped: int  # rows that did not fit in the disk budget


class Segment:
    """A segment claimed for replay (its lock is held until released)."""

    def __init__(self, journal: SpillJournal, path: Path, fd: int) -> None:
        self._journal = journal
        self.path = path
        self._fd = fd

    def read(self) -> tuple[list[UsageRecord], int]:
        """The rows of the segment, and the number of lines that could not
        be read (a torn last line after a crash)."""
        with open(self._fd, "rb", closefd=False) as f:
            f.seek(0)
            header = f.readline()
            if header and header != _HEADER:
                raise ValueError(f"{self.path.name}: unknown journal format")
            records: list[UsageRecord] = []
            bad = 0
            for line in f:
                try:
                    records.append(decode_record(line))
                except (ValueError, TypeError):
                    bad += 1
            return records, bad

    def delete(self) -> None:
        """Remove the segment (its rows are in the database) and release it."""
        with self._journal._lock:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self._close()
            self._journal._recount()

    def set_aside(self) -> Path:
        """Rename an unreadable segment out of the replay's way."""
        with self._journal._lock:
            target = self.path.with_suffix(".unreadable")
            os.replace(self.path, target)
            self._close()
            self._journal._recount()
            return target

    def release(self) -> None:
        """Give the segment back (it will be replayed later)."""
        with self._journal._lock:
            self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


class SpillJournal:
    def __init__(
        self, directory: Path, *, max_bytes: int, segment_bytes: int = 4 * 1024 * 1024
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._fd = -1  # the segment this process is writing (locked)
        self._path: Path | None = None
        self._written = 0
        #: bytes in the directory's segments, as last counted (every process's)
        self.size = 0

    # --- writing ------------------------------------------------------------------

    def append(self, records: list[UsageRecord]) -> AppendResult:
        """Append rows (durably: fsync) while the disk budget allows; the
        rest are reported as dropped."""
        if not records:
            return AppendResult(0, 0)
        with self._lock:
            self._ensure_dir()
            used = self._recount()
            room = self.max_bytes - used
            lines = []
            size = 0
            for r in records:
                line = encode_record(r)
                extra = len(line) + (len(_HEADER) if self._fd < 0 and not lines else 0)
                if size + extra > room:
                    break
                lines.append(line)
                size += extra
            if not lines:
                return AppendResult(0, len(records))
            if self._fd < 0:
                self._open_segment()
            data = b"".join(lines)
            try:
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except BaseException:
                # (a short write - the disk full - would leave a torn line for
                # the next append to glue its first row onto, and whole lines
                # of rows the caller counts as dropped: the segment is cut
                # back to before this append and finished)
                try:
                    os.ftruncate(self._fd, self._written)
                finally:
                    try:
                        self._close_segment()
                    except OSError:
                        pass
                raise
            self._written += len(data)
            self.size = used + size
            if self._written >= self.segment_bytes:
                self._close_segment()
            return AppendResult(len(lines), len(records) - len(lines))

    def close(self) -> None:
        """Finish the segment being written (it stays for replay)."""
        with self._lock:
            self._close_segment()

    def _open_segment(self) -> None:
        # made, locked and given its header under a name replays do not
        # list, then renamed (the lock goes with it): a segment is never seen
        # unlocked, so another process's replay cannot claim it as empty and
        # delete it under its writer
        name = f"{_PREFIX}{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{_SUFFIX}"
        path = self.directory / name
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, _HEADER)
            os.rename(tmp, path)
            fsync_dir(self.directory)  # (the name survives a power loss before a row is reported)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)  # (gone once renamed)
            raise
        self._fd, self._path, self._written = fd, path, len(_HEADER)

    def _sweep_unborn(self) -> None:
        """Remove segments a crashed process left before naming them (they
        hold no row: rows are written only after the rename)."""
        try:
            entries = [e for e in os.scandir(self.directory) if e.name.startswith(_TMP_PREFIX)]
        except FileNotFoundError:
            return
        stale = time.time() - 60  # (a live one is named within microseconds)
        for e in entries:
            try:
                if e.stat().st_mtime > stale:
                    continue
            except FileNotFoundError:
                continue
            try:
                fd = os.open(e.path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # being made right now
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)

    def _close_segment(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd, self._path, self._written = -1, None, 0

    def _ensure_dir(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    # --- replaying ----------------------------------------------------------------

    def segments(self) -> list[Path]:
        """Segment files in the directory (every process's), oldest first."""
        try:
            names = sorted(
                e.name
                for e in os.scandir(self.directory)
                if e.name.startswith(_PREFIX) and e.name.endswith(_SUFFIX)
            )
        except FileNotFoundError:
            return []
        return [self.directory / n for n in names]

    def has_segments(self) -> bool:
        with self._lock:
            self._recount()
            return bool(self.segments())

    def claim(self) -> Segment | None:
        """The oldest segment nobody is writing or replaying, locked for
        the caller; None when there is none. The segment this process is
        writing is finished first, so that its rows can be replayed too."""
        with self._lock:
            self._close_segment()
            self._sweep_unborn()
            for path in self.segments():
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # replayed and deleted by another process
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                if not path.exists():  # deleted between open and lock
                    os.close(fd)
                    continue
                return Segment(self, path, fd)
            return None

    def _recount(self) -> int:
        total = 0
        for path in self.segments():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        self.size = total
        return total


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
