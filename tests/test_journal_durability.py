"""The usage spill journal's durability under a failed write and under
several workers sharing its directory."""

from __future__ import annotations

import errno
import fcntl
import os

import lectr.usage.journal as journal_mod
from lectr.usage.journal import SpillJournal
from tests.test_usage_recorder import rec


def _all_rows(journal: SpillJournal):
    rows, bad = [], 0
    while (seg := journal.claim()) is not None:
        r, b = seg.read()
        rows += r
        bad += b
        seg.delete()
    return rows, bad


def test_a_failed_partial_write_does_not_swallow_the_next_appended_row(tmp_path, monkeypatch):
    """ENOSPC after a partial write must not leave a torn fragment in the
    open segment for the next append to glue its first row onto (a row
    reported written, unreadable on replay): the segment is cut back."""
    journal = SpillJournal(tmp_path, max_bytes=10**7)
    first = rec()
    assert journal.append([first]).written == 1

    real_write = os.write
    state = {"armed": True, "calls": 0}

    def flaky_write(fd, data):
        if state["armed"] and fd == journal._fd:
            state["calls"] += 1
            if state["calls"] == 1:
                return real_write(fd, bytes(data[:10]))  # a short write
            state["armed"] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", flaky_write)
    lost = [rec(), rec()]
    try:
        journal.append(lost)
    except OSError:
        pass  # the recorder counts these rows as dropped (spill_error)
    monkeypatch.setattr(os, "write", real_write)

    later = rec()  # the disk has room again
    assert journal.append([later]).written == 1
    journal.close()

    rows, _bad = _all_rows(journal)
    ids = {r.request_id for r in rows}
    assert first.request_id in ids
    assert later.request_id in ids, "a row reported written was lost to the torn fragment"


def test_a_replay_cannot_delete_a_segment_another_worker_is_creating(tmp_path, monkeypatch):
    """A segment being made is never visible unlocked: another worker's
    claim() between its creation and its lock finds nothing to take (it
    once took it as empty and deleted it, the writer then fsyncing rows
    into an unlinked file)."""
    writer = SpillJournal(tmp_path, max_bytes=10**7)
    other = SpillJournal(tmp_path, max_bytes=10**7)  # another worker, same data dir
    real_flock = fcntl.flock
    state = {"armed": True}

    def interleaved_flock(fd, op):
        if state["armed"]:
            state["armed"] = False  # the writer's flock, just after os.open
            assert other.claim() is None  # the replaying worker runs now
        return real_flock(fd, op)

    monkeypatch.setattr(journal_mod.fcntl, "flock", interleaved_flock)
    row = rec()
    result = writer.append([row])
    monkeypatch.setattr(journal_mod.fcntl, "flock", real_flock)
    assert result.written == 1  # reported durable
    writer.close()

    rows, _ = _all_rows(other)
    assert [r.request_id for r in rows] == [row.request_id], "a row reported written is gone"


def test_segments_a_crashed_process_left_unnamed_are_swept_once_stale(tmp_path):
    """A process that died between making a segment and naming it leaves an
    unnamed file (no row in it: rows are written after the rename); a replay
    removes it once it is a minute old, never one being made now."""
    journal = SpillJournal(tmp_path, max_bytes=10**7)
    stale = tmp_path / ".unborn-spill-00000000000000000001-1-aaaa.jsonl"
    fresh = tmp_path / ".unborn-spill-00000000000000000002-1-bbbb.jsonl"
    for path in (stale, fresh):
        path.write_bytes(b"")
    os.utime(stale, (0, 0))
    assert journal.claim() is None
    assert not stale.exists()
    assert fresh.exists()
