"""The local write-ahead journal: what the API acknowledges is on disk before the answer leaves.

A request thread calls :meth:`Journal.append`. When no commit is in progress, the caller commits its
rows itself (one ``write`` + one ``fsync``, no hand-off to another thread on the answer's path: on
busy cores every wake-up of another thread costs a scheduling delay). While a commit is in progress,
appends wait (at most ``deadline_s``) for the journal's committer thread, which takes every append
waiting at that moment into the next ``write`` + ``fsync`` (group commit), so under load one fsync
covers many requests and the wait is one fsync or two. While the disk is failing every append goes
through the committer thread, which also probes the disk.

The journal is a series of segment files ``journal-<pid>-<token>-<n>.jsonl`` in the log's spill
folder, in the spill-file format (one JSON line per append, see
:func:`~policy_api.log.encode_spill_line`). The process holds an exclusive ``flock`` on each segment
it owns. The :class:`~policy_api.log.LogWriter` reports rows it wrote to the database
(:meth:`Journal.settle`) and rows it gave up keeping in memory (:meth:`Journal.abandon`: a database
outage, a full queue, a stalled flush). A closed segment whose rows all reached the database is
deleted; one with abandoned rows is released (its lock dropped) so that the writer's replay inserts
it, idempotently. After a crash the kernel drops the locks and whichever process starts next replays
the segments; rows both written and still journaled are inserted twice and kept once
(``ON CONFLICT DO NOTHING``).

A failed write (disk full, file size limit) is cut back to the last complete line, so a segment
never holds a torn line in its middle; the append raises :class:`JournalUnavailable` (HTTP 503) and
the journal probes the disk every ``retry_s`` until it can write again (:attr:`Journal.ok`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Unavailable

__all__ = ["Journal", "JournalUnavailable"]

log = logging.getLogger("homepage.log.journal")


class JournalUnavailable(Unavailable):
    """Rows could not be made durable (the journal's disk is failing or too slow): retry later."""

    code = "not_durable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Segment:
    number: int
    path: Path
    fd: int
    created: float
    size: int = 0
    appended: int = 0  # rows durably appended
    settled: int = 0  # rows reported written to the database
    abandoned: bool = False  # some rows will only reach the database by a replay of the file
    closed: bool = False  # no more appends


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Group-committed, fsync'd, append-only journal of log rows (one per process and spill folder).

    Parameters
    ----------
    directory
        The log's spill folder (shared by every process writing the same log; created if missing).
    encode
        ``encode(table, rows) -> bytes``: one complete line (the spill-file encoder).
    deadline_s
        Longest time :meth:`append` waits for its rows to be durable before raising
        :class:`JournalUnavailable`.
    max_segment_bytes
        A segment is closed once it is this large (a new one is opened for the next append).
    retry_s
        While failing, how often the committer probes the disk (and the ``Retry-After`` it advises).
    min_free_bytes
        Below this much free space on its disk the journal reports itself not :attr:`ok` (readiness),
        before a write fails.
    sync
        True: an append returns once its rows are fsync'd (they survive a machine crash). False: once
        they are written into the operating system's page cache (they survive a crash or ``kill -9``
        of the process, not of the machine), the fsync following right after, off the caller's time.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        encode: Any,
        *,
        deadline_s: float = 1.0,
        max_segment_bytes: int = 8 << 20,
        retry_s: float = 1.0,
        min_free_bytes: int = 64 << 10,
        sync: bool = True,
    ) -> None:
        for name, value in (("deadline_s", deadline_s), ("retry_s", retry_s)):
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{name} must be a number > 0; got {value!r}")
        if not (isinstance(max_segment_bytes, int) and max_segment_bytes >= 1):
            raise ValueError(f"max_segment_bytes must be an int >= 1; got {max_segment_bytes!r}")
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._encode = encode
        self._deadline = float(deadline_s)
        self._max_bytes = max_segment_bytes
        self._retry = float(retry_s)
        self._min_free = int(min_free_bytes)
        self._sync = bool(sync)
        self._token = uuid.uuid4().hex[:8]

        # appends waiting for the committer, and the answers it gives them
        self._qlock = threading.Lock()
        self._qcv = threading.Condition(self._qlock)
        self._pending: list[tuple[int, str, list[Mapping[str, Any]]]] = []
        self._results: dict[int, int | BaseException] = {}
        self._gave_up: set[int] = set()
        self._ticket = 0
        self._stop = False
        self._committing = False  # a commit (by a caller or the committer thread) is in progress

        # segments (file I/O is done holding this lock)
        self._flock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._next_number = 0
        self._error: str | None = None
        self._failed_at = 0.0
        self._counts = {"appends": 0, "rows": 0, "commits": 0, "failures": 0}

        self._thread = threading.Thread(target=self._run, name="homepage-journal", daemon=True)
        self._thread.start()
        self._dirty = threading.Event()
        if not self._sync:
            threading.Thread(target=self._syncer, name="homepage-journal-sync", daemon=True).start()

    # ------------------------------------------------------------------------------ public surface

    @property
    def ok(self) -> bool:
        """False while the last write (or probe) failed, or the disk has less than ``min_free_bytes``
        left: nothing (or soon nothing) can be made durable."""
        with self._flock:
            if self._error is not None:
                return False
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= self._min_free

    def append(self, table: str, rows: list[Mapping[str, Any]]) -> int:
        """Write ``rows`` of ``table`` durably; return the number of the segment that holds them.

        A caller that commits its own rows (no other commit in progress) returns once its ``fsync``
        does: a slow disk delays its answer rather than refusing rows that are already durable.

        Raises
        ------
        JournalUnavailable
            The rows could not be written (the disk fails), or, waiting on another commit, were not
            written and fsync'd within ``deadline_s``.
        ValueError
            The rows cannot be encoded (not JSON-serialisable).
        """
        deadline = time.monotonic() + self._deadline
        with self._qcv:
            if self._stop:
                raise JournalUnavailable("the journal is closed", retry_after_s=self._retry)
            self._ticket += 1
            ticket = self._ticket
            self._pending.append((ticket, table, rows))
            lead = not self._committing and self._error is None
            if lead:  # nobody is committing: commit what waits (this append, at least) here
                self._committing = True
                batch, self._pending = self._pending, []
            else:
                self._qcv.notify_all()
        if lead:
            self._commit_and_answer(batch)
        with self._qcv:
            while ticket not in self._results:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._gave_up.add(ticket)
                    raise JournalUnavailable(
                        f"journal write not durable within deadline_s={self._deadline:g}", retry_after_s=self._retry)
                self._qcv.wait(left)
            got = self._results.pop(ticket)
        if isinstance(got, BaseException):
            raise got
        return got

    def settle(self, counts: Mapping[int, int]) -> None:
        """``counts[segment]`` more rows of these segments reached the database."""
        with self._flock:
            for number, n in counts.items():
                seg = self._segments.get(number)
                if seg is not None:
                    seg.settled += n

    def abandon(self, numbers: Iterable[int]) -> None:
        """Rows of these segments will not be written from memory: replay the files instead."""
        with self._flock:
            for number in numbers:
                seg = self._segments.get(number)
                if seg is not None:
                    seg.abandoned = True

    def maintain(self, rotate_after_s: float) -> bool:
        """Close the active segment if it is older than ``rotate_after_s``; delete closed segments whose
        rows all reached the database; release those with abandoned rows. Returns True when a
        segment was released (a replay should follow)."""
        released = False
        with self._flock:
            act = self._active
            if act is not None and time.monotonic() - act.created >= rotate_after_s:
                act.closed = True
                self._active = None
            for number in [n for n, s in self._segments.items() if s.closed]:
                seg = self._segments[number]
                if seg.abandoned:
                    released = True
                    if not self._sync:
                        try:
                            os.fsync(seg.fd)
                        except OSError as exc:
                            self._fail(exc)
                elif seg.settled < seg.appended:
                    continue
                else:
                    try:
                        os.unlink(seg.path)
                    except FileNotFoundError:
                        pass
                os.close(seg.fd)  # releases the lock: any process may replay what is left
                del self._segments[number]
        return released

    def close(self, timeout: float = 5.0) -> None:
        """Commit what is pending, then release every segment (deleted if fully settled)."""
        with self._qcv:
            self._stop = True
            self._qcv.notify_all()
        self._thread.join(timeout)
        with self._flock:
            for seg in self._segments.values():
                seg.closed = True
                seg.abandoned = seg.abandoned or seg.settled < seg.appended
            self._active = None
        self.maintain(0.0)

    def stats(self) -> dict[str, Any]:
        with self._flock:
            return {**self._counts, "segments": len(self._segments), "ok": self._error is None,
                    "error": self._error}

    def own_paths(self) -> set[Path]:
        """Paths of the segments this journal still holds (the replay skips them)."""
        with self._flock:
            return {s.path for s in self._segments.values()}

    # ------------------------------------------------------------------------------------ committer

    def _run(self) -> None:
        while True:
            with self._qcv:
                while (not self._pending or self._committing) and not self._stop:
                    failing = self._error is not None
                    if not self._qcv.wait(self._retry if failing else None) and failing and not self._committing:
                        break  # probe
                while self._committing:  # stopping: let a caller's commit finish first
                    self._qcv.wait()
                if self._stop and not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._committing = bool(batch)
            if batch:
                self._commit_and_answer(batch)
            else:
                self._probe()

    def _commit_and_answer(self, batch: list[tuple[int, str, list[Mapping[str, Any]]]]) -> None:
        """Commit ``batch`` (the caller set ``_committing``), post each append's answer, wake everyone."""
        try:
            answers = self._commit(batch)
        except BaseException as exc:  # never leave an append without an answer, nor the journal locked
            answers = {ticket: exc for ticket, _, _ in batch}
        with self._qcv:
            self._committing = False
            for ticket, got in answers.items():
                if ticket in self._gave_up:
                    self._gave_up.discard(ticket)
                    if isinstance(got, int):
                        self.abandon([got])  # durable, but its caller went on without it
                    continue
                self._results[ticket] = got
            self._qcv.notify_all()  # the waiting appends, and the committer thread for what queued meanwhile
        if not self._sync:
            self._dirty.set()

    def _syncer(self) -> None:
        """In ``sync=False`` mode: fsync the active segment soon after each write, off the committer
        (a duplicate descriptor, so that rotation may close the segment meanwhile)."""
        while True:
            self._dirty.wait()
            self._dirty.clear()
            with self._flock:
                seg = self._active
                fd = os.dup(seg.fd) if seg is not None else None
            if fd is None:
                continue
            try:
                os.fsync(fd)
            except OSError as exc:
                with self._flock:
                    self._fail(exc)
            finally:
                os.close(fd)

    def _open_segment(self) -> _Segment:
        self._next_number += 1
        name = f"journal-{os.getpid()}-{self._token}-{self._next_number}.jsonl"
        # Created and locked under a name no replayer looks for, then renamed into place: a replayer
        # scanning the folder could otherwise lock the new file between our create and our lock,
        # claim it as an orphan, and delete it under us.
        staging = self._dir / f".{name}.new"
        path = self._dir / name
        fd = os.open(staging, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a name nobody else knows: never contended
            os.rename(staging, path)
            _fsync_dir(self._dir)
        except OSError:
            os.close(fd)
            for leftover in (staging, path):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
            raise
        seg = _Segment(self._next_number, path, fd, time.monotonic())
        self._segments[seg.number] = seg
        return seg

    def _write(self, data: bytes) -> _Segment:
        """Append ``data`` to the active segment and fsync it; on failure cut the file back."""
        seg = self._active
        if seg is None or seg.size >= self._max_bytes:
            if seg is not None:
                if not self._sync:
                    os.fsync(seg.fd)
                seg.closed = True
                self._active = None
            seg = self._active = self._open_segment()
        try:
            _write_all(seg.fd, data)
            if self._sync:
                os.fsync(seg.fd)
        except OSError:
            try:  # no torn line in the middle of a segment: later appends must start on a line
                os.ftruncate(seg.fd, seg.size)
            except OSError:
                seg.closed = True  # cannot repair it: start a new segment next time
                self._active = None
            raise
        seg.size += len(data)
        return seg

    def _commit(self, batch: list[tuple[int, str, list[Mapping[str, Any]]]]) -> dict[int, int | BaseException]:
        answers: dict[int, int | BaseException] = {}
        parts: list[bytes] = []
        good: list[tuple[int, int]] = []  # (ticket, rows)
        for ticket, table, rows in batch:
            try:
                parts.append(self._encode(table, rows))
                good.append((ticket, len(rows)))
            except (TypeError, ValueError) as exc:
                answers[ticket] = ValueError(f"log rows must be JSON-serialisable: {exc}")
        if not good:
            return answers
        with self._flock:
            try:
                seg = self._write(b"".join(parts))
            except OSError as exc:
                self._fail(exc)
                err = JournalUnavailable(f"journal not writable: {type(exc).__name__}: {exc.strerror or exc}",
                                         retry_after_s=self._retry)
                for ticket, _ in good:
                    answers[ticket] = err
                return answers
            n_rows = sum(n for _, n in good)
            seg.appended += n_rows
            self._counts["appends"] += len(good)
            self._counts["rows"] += n_rows
            self._counts["commits"] += 1
            if self._error is not None:
                log.warning("journal writable again")
            self._error = None
        for ticket, _ in good:
            answers[ticket] = seg.number
        return answers

    def _probe(self) -> None:
        with self._flock:
            if self._error is None or time.monotonic() - self._failed_at < self._retry:
                return
            try:
                self._write(b"\n")  # a blank line: replay skips it
            except OSError as exc:
                self._fail(exc)
                return
            log.warning("journal writable again")
            self._error = None

    def _fail(self, exc: OSError) -> None:
        if self._error is None:
            log.error("journal write failed; feedback is refused until it recovers: %s", exc)
        self._error = f"{type(exc).__name__}: {exc.strerror or exc}"
        self._failed_at = time.monotonic()
        self._counts["failures"] += 1
