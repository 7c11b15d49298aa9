"""Batched background writer for the decision log, with a spill file for database outages.

Request threads call :meth:`LogWriter.submit_decision` / :meth:`LogWriter.submit_feedback`, which
append to an in-memory queue under a lock held for a few microseconds and return. A daemon thread
drains the queue every ``flush_interval_s`` (or as soon as ``batch_size`` rows wait) and inserts each
batch in one transaction, idempotently (``ON CONFLICT DO NOTHING`` on ``request_id`` / ``event_id``):
the rows are encoded in the writer thread (JSON by orjson, the candidates in their columnar form),
then go to the driver as tuples, an executemany on SQLite (a backlog in transactions of up to
``SQLITE_BATCHES_PER_TRANSACTION`` batches) and ``COPY`` on PostgreSQL.

Nothing is dropped:

* **Database trouble** (cannot connect, timeout, read-only, missing table, ...): the batch is
  appended to ``spill_dir/spill-<pid>.jsonl`` (one JSON line per batch, fsync'd) and the writer
  backs off (0.1 s doubling to ``max_backoff_s``); while backing off, batches go straight to the
  spill file. When an insert succeeds again (or :meth:`LogWriter.set_engine` /
  ``flush(replay=True)`` asks), every spill file in ``spill_dir`` is replayed, including those left
  by other or dead processes.
* **Queue full**: the caller appends its rows to the spill file itself (a ``write`` into the page
  cache, no fsync; the writer thread fsyncs within ``flush_interval_s``); they are replayed once the
  queue has drained.
* **Rows the database refuses** (constraint or type errors, e.g. a naive timestamp, a missing
  ``event_id``): the batch is bisected so that good rows are written and each refused row lands,
  with the error, in ``spill_dir/rejected-<pid>.jsonl`` for a human to inspect.

Replay protocol (safe between processes sharing ``spill_dir``): a process holds an exclusive
``flock`` on its own spill file while it has it open. To replay a file a process takes its lock
without waiting (a live owner makes this fail, so the file is skipped), checks that the path still
names the locked inode, renames it to ``replay-<pid>-<uuid>.jsonl``, inserts its rows idempotently,
deletes it and only then releases the lock. A replay cut short by another outage leaves the
``replay-*`` file, which any process retries later; the inserts are idempotent, so a partial replay
repeated never duplicates a row.

Spill lines are ``{"table": "decisions" | "feedback", "rows": [...]}``; datetimes are written as
``{"$dt": "<ISO 8601>"}`` and restored as aware datetimes, numpy values as plain JSON numbers/lists.

Create the writer after a fork (one per gunicorn worker): its thread does not survive ``fork``.
"""

from __future__ import annotations

import atexit
import base64
import fcntl
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ._journal import Journal, JournalUnavailable, _fsync_dir, _write_all
from ._rows import write_decisions, write_feedback
from ._schema import utcnow

__all__ = ["SQLITE_BATCHES_PER_TRANSACTION", "LogWriter", "decode_spill_line", "encode_spill_line"]

log = logging.getLogger("homepage.log.writer")

DECISIONS = "decisions"
FEEDBACK = "feedback"
_WRITERS: dict[str, Callable[[Connection, Sequence[Mapping[str, Any]]], int]] = {
    DECISIONS: write_decisions,
    FEEDBACK: write_feedback,
}
#: on SQLite, a backlog is written in transactions of up to this many batches: a commit (and the
#: WAL checkpoint it may trigger) per ``batch_size`` rows costs more than the rows themselves
SQLITE_BATCHES_PER_TRANSACTION = 8


def _insert_rows(conn: Connection, table: str, rows: Sequence[Mapping[str, Any]]) -> int:
    """The writer's insert (:func:`write_decisions` / :func:`write_feedback`): rows encoded here, in
    the writer thread, then an executemany on SQLite or ``COPY`` on PostgreSQL, idempotently."""
    return _WRITERS[table](conn, rows)


_Entry = tuple[int, str, Mapping[str, Any], int]  # (submission seq, table, row, journal segment or -1)


# ----------------------------------------------------------------------------------------- spill I/O


def _spill_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return {"$dt": obj.isoformat()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"$b64": base64.b64encode(bytes(obj)).decode("ascii")}
    raise TypeError(f"spilled row values must be JSON-serialisable; got {type(obj).__name__} {obj!r}")


def _spill_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        if "$dt" in obj:
            return datetime.fromisoformat(obj["$dt"])
        if "$b64" in obj:
            return base64.b64decode(obj["$b64"])
    return obj


_ORJSON_OPTS = (orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
                | orjson.OPT_APPEND_NEWLINE)


def encode_spill_line(table: str, rows: list[Mapping[str, Any]]) -> bytes:
    """One spill-file line (JSON + newline) holding ``rows`` of ``table``.

    orjson first (the journal encodes every acknowledged row on its way to the answer; it writes NaN
    and infinities as null, as the log's JSON columns store them); the standard library for what
    orjson refuses (e.g. integers beyond 64 bits).
    """
    obj = {"table": table, "rows": rows}
    try:
        line: bytes = orjson.dumps(obj, default=_spill_default, option=_ORJSON_OPTS)
        return line
    except TypeError:  # orjson.JSONEncodeError
        pass
    text = json.dumps(obj, default=_spill_default, separators=(",", ":"))
    return (text + "\n").encode("utf-8")


def decode_spill_line(line: bytes) -> tuple[str, list[dict[str, Any]]]:
    """Inverse of :func:`encode_spill_line`; datetimes come back timezone-aware.

    Raises
    ------
    ValueError
        For a line that is not a complete spill record (e.g. cut short by a crash).
    """
    obj = json.loads(line, object_hook=_spill_hook)
    if not isinstance(obj, dict) or obj.get("table") not in _WRITERS or not isinstance(obj.get("rows"), list):
        raise ValueError(f"spill line must be {{'table': 'decisions'|'feedback', 'rows': [...]}}; got {line[:80]!r}")
    return obj["table"], obj["rows"]


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (own.st_ino, own.st_dev)


def _is_data_error(exc: BaseException) -> bool:
    """True when the rows are at fault (retrying cannot help), False for database trouble."""
    if isinstance(exc, sa.exc.IntegrityError | sa.exc.DataError):
        return True
    # the COPY path talks to psycopg directly: SQLSTATE class 22 (data exception) or 23 (constraint)
    state = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "orig", None), "sqlstate", None)
    if isinstance(state, str) and state[:2] in ("22", "23"):
        return True
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        return True  # bind processing: a naive timestamp, an unserialisable JSON value
    return isinstance(exc, TypeError | ValueError | KeyError | AttributeError)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else text[:497] + "..."


class _Trouble(Exception):
    """The database failed while rows were left unwritten."""

    def __init__(self, cause: BaseException, unwritten: list[Mapping[str, Any]]):
        super().__init__(_describe(cause))
        self.cause = cause
        self.unwritten = unwritten


# -------------------------------------------------------------------------------------------- writer


class LogWriter:
    """Bounded queue + background batch flusher + spill file for decisions and feedback.

    Parameters
    ----------
    engine
        Where rows go (tables created by the migrations). Replaceable at runtime with
        :meth:`set_engine`.
    spill_dir
        Folder for ``spill-<pid>.jsonl``, ``replay-*.jsonl`` and ``rejected-<pid>.jsonl``; shared by
        every process that writes the same log. Created if missing.
    max_queue
        Rows held in memory at most; more go straight to the spill file.
    batch_size
        Rows per insert (also the queue depth that wakes the writer early); on SQLite a backlog is
        written up to ``SQLITE_BATCHES_PER_TRANSACTION`` batches per transaction.
    flush_interval_s
        Longest time a row waits in the queue when the database is healthy.
    max_backoff_s
        Cap of the exponential backoff between attempts while the database is failing.
    rescan_interval_s
        While healthy, how often to look for spill files left by other (dead) processes.
    start
        Start the background thread now (else call :meth:`start`).
    durable
        Journal every submission before it returns (:class:`~policy_api.log.Journal` in
        ``spill_dir``): what was submitted survives a crash. Feedback that cannot be journaled raises
        :class:`~policy_api.log.JournalUnavailable`; decisions are then kept in memory if there is
        room, else dropped and counted (``dropped``, ``dropped_propensity``).
    journal_deadline_s
        With ``durable``: longest wait of a submission for its fsync.
    journal_sync
        With ``durable``: True waits for the fsync (survives a machine crash); False for the write
        into the page cache (survives the process's crash), the fsync following off the caller's time.
    stall_s
        A database write in flight longer than this marks the writer unhealthy (a frozen server):
        new rows stop queueing in memory (they wait in the journal or the spill file).

    Examples
    --------
    >>> writer = LogWriter(engine, "homepage-data/spill")          # doctest: +SKIP
    >>> writer.submit_decision({"request_id": "r1", "ts": now, ...})  # doctest: +SKIP
    >>> writer.close()                                             # doctest: +SKIP
    """

    def __init__(
        self,
        engine: Engine,
        spill_dir: str | os.PathLike[str],
        max_queue: int = 20_000,
        batch_size: int = 1000,
        flush_interval_s: float = 0.05,
        *,
        max_backoff_s: float = 5.0,
        rescan_interval_s: float = 30.0,
        start: bool = True,
        durable: bool = False,
        journal_deadline_s: float = 1.0,
        journal_sync: bool = True,
        stall_s: float = 3.0,
        rotate_s: float = 1.0,
    ) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a sqlalchemy Engine; got {type(engine).__name__}")
        for name, value in (("max_queue", max_queue), ("batch_size", batch_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        for name, fvalue in (
            ("flush_interval_s", flush_interval_s),
            ("max_backoff_s", max_backoff_s),
            ("rescan_interval_s", rescan_interval_s),
            ("stall_s", stall_s),
            ("rotate_s", rotate_s),
        ):
            if not fvalue > 0:
                raise ValueError(f"{name} must be > 0; got {fvalue!r}")
        self._engine = engine
        self._dir = Path(spill_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._interval = float(flush_interval_s)
        self._max_backoff = float(max_backoff_s)
        self._rescan = float(rescan_interval_s)
        self._stall = float(stall_s)
        self._rotate = float(rotate_s)
        self._busy_since: float | None = None  # a database write in flight since
        self._journal = (Journal(self._dir, encode_spill_line, deadline_s=journal_deadline_s, sync=journal_sync)
                         if durable else None)

        self._lock = threading.Lock()
        self._done_cv = threading.Condition(self._lock)
        self._queue: deque[_Entry] = deque()
        self._wake = threading.Event()
        self._seq = 0  # submissions so far
        self._done_seq = 0  # every submission <= this is written, spilled or rejected
        self._counts: dict[str, Any] = {"submitted": 0, "written": 0, "spilled": 0, "replayed": 0, "rejected": 0,
                                        "journaled": 0, "unjournaled": 0, "refused": 0, "dropped": 0,
                                        "dropped_propensity": 0.0}
        self._last_error: str | None = None
        self._healthy = True
        self._backoff = 0.0
        self._retry_at = 0.0
        self._replay_requested = 1  # replay leftovers of earlier runs at start
        self._replay_done = 0
        self._next_scan = 0.0
        self._replay_retry_at = 0.0  # after a replay failed on the local disk (e.g. full)
        self._replay_backoff = 0.0
        self._stop = False
        self._closed = False

        self._spill_lock = threading.Lock()
        self._spill_fd: int | None = None
        self._spill_path: Path | None = None
        self._spill_unsynced = False
        self._spill_pending = 0  # rows in our own spill file, not yet replayed

        self._thread = threading.Thread(target=self._run, name="homepage-logwriter", daemon=True)
        ref = weakref.ref(self)
        self._atexit: Callable[[], None] = lambda: _close_at_exit(ref)
        atexit.register(self._atexit)
        if start:
            self.start()

    # ------------------------------------------------------------------------------ public surface

    def start(self) -> None:
        """Start the background thread (once)."""
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()

    @property
    def engine(self) -> Engine:
        return self._engine

    def set_engine(self, engine: Engine) -> None:
        """Point the writer at another engine (e.g. a failover database); retry and replay now."""
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a sqlalchemy Engine; got {type(engine).__name__}")
        with self._lock:
            self._engine = engine
            self._backoff = 0.0
            self._retry_at = 0.0
            self._replay_requested += 1
        self._wake.set()

    def submit_decision(self, row: Mapping[str, Any]) -> bool:
        """Queue one ``decisions`` row (a dict keyed by column). Never blocks on, or raises for, the DB.

        A missing ``ts`` is set to now (UTC). Returns False when a durable writer could not journal
        the row (it is then kept in memory if there is room, else dropped and counted).
        """
        if row.get("ts") is None:
            row = {**row, "ts": utcnow()}
        return self._submit(DECISIONS, [row])

    def submit_feedback(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Queue ``feedback`` rows. ``received_at`` defaults to now; ``ts`` (event time) to ``received_at``.

        Raises
        ------
        JournalUnavailable
            A durable writer could not journal the rows (nothing was kept: the client should retry).
        """
        now = utcnow()
        batch = [r if r.get("received_at") is not None else {**r, "received_at": now} for r in rows]
        self._submit(FEEDBACK, batch)

    def flush(self, timeout: float | None = None, *, replay: bool = False) -> bool:
        """Wait until every row submitted before this call is written, spilled (fsync'd) or rejected.

        With ``replay=True`` also wait for a complete replay of ``spill_dir`` started after this
        call (retried now even during a backoff). Returns False if ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._seq
            want = 0
            if replay:
                self._replay_requested += 1
                want = self._replay_requested
                self._retry_at = 0.0
        self._wake.set()
        with self._done_cv:
            while self._done_seq < target or self._replay_done < want:
                if not self._thread.is_alive():
                    break
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    break
                self._done_cv.wait(wait)
            ok = self._done_seq >= target and self._replay_done >= want
        self._sync_spill()
        return ok

    def close(self, timeout: float = 10.0) -> None:
        """Flush, stop the thread, and spill whatever could not be written within ``timeout`` s."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._lock:
            self._stop = True
            self._closed = True
        self._wake.set()
        if self._thread.is_alive():  # stuck in a frozen database: its rows are journaled or re-spilled below
            self._thread.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            leftover = list(self._queue)
            self._queue.clear()
        if leftover:
            try:
                self._shelve(leftover)
            except OSError as exc:  # neither database nor disk: nothing more can be done for them
                lost = [e for e in leftover if e[3] < 0]
                log.error("log writer closed with %d rows neither written nor spilled: %s", len(lost), exc)
                with self._lock:
                    self._counts["dropped"] += len(lost)
        try:
            self._close_spill()
        except OSError as exc:
            log.error("spill file not synced at close: %s", exc)
        if self._journal is not None:
            self._journal.close(timeout=1.0)
        atexit.unregister(self._atexit)

    def _close_spill(self) -> None:
        with self._spill_lock:
            if self._spill_fd is not None:
                fd = self._spill_fd
                self._spill_fd = None
                self._spill_path = None
                self._spill_unsynced = False
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)  # releases the lock: any process may replay it now

    def stats(self) -> dict[str, Any]:
        """Counters: ``submitted``, ``written`` (reached the DB from the queue, duplicates included),
        ``spilled`` (went to the spill file), ``replayed`` (inserted from spill files),
        ``rejected`` (refused by the DB, kept in ``rejected-<pid>.jsonl``), ``queue_depth``,
        ``last_error``, ``healthy`` (False while the database fails or a write has stalled for
        ``stall_s``), ``stalled``; with a journal also ``journaled`` (rows made durable), ``refused``
        (feedback rows that could not be), ``unjournaled`` (decisions that could not be, kept
        in memory), ``dropped`` / ``dropped_propensity`` (decisions neither
        journaled nor kept in memory, and the sum of their propensities), ``journal_commits`` (fsyncs:
        rows per commit measure the group commit) and ``durable`` (the journal can write now); without
        one ``durable`` is always True."""
        journal_ok = self._journal.ok if self._journal is not None else True
        commits = self._journal.stats()["commits"] if self._journal is not None else 0
        with self._lock:
            stalled = self._stalled()
            return {
                **self._counts,
                "queue_depth": len(self._queue),
                "last_error": self._last_error,
                "healthy": self._healthy and not stalled,
                "stalled": stalled,
                "durable": journal_ok,
                "journal_commits": commits,
            }

    def _stalled(self) -> bool:
        """A database write in flight for longer than ``stall_s`` (called with the lock held)."""
        return self._busy_since is not None and time.monotonic() - self._busy_since > self._stall

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- submitting

    def _submit(self, table: str, rows: list[Mapping[str, Any]]) -> bool:
        n = len(rows)
        if n == 0:
            return True
        seg = -1
        if self._journal is not None and not self._closed:
            try:
                seg = self._journal.append(table, rows)
            except JournalUnavailable:
                if table == FEEDBACK:
                    with self._lock:
                        self._counts["refused"] += n
                    raise
                with self._lock:  # best effort: the database may still take it from memory
                    if not self._closed and not self._stalled() and len(self._queue) + n <= self._max_queue:
                        self._seq += 1
                        self._counts["submitted"] += n
                        self._counts["unjournaled"] += n
                        self._queue.extend([(self._seq, table, r, -1) for r in rows])
                    else:
                        self._counts["dropped"] += n
                        self._counts["dropped_propensity"] += sum(float(r.get("propensity") or 0.0) for r in rows)
                return False
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._counts["submitted"] += n
            if seg >= 0:
                self._counts["journaled"] += n
            closed = self._closed
            # a stalled flush (frozen database) stops the queue growing: rows wait on disk instead
            queued = not closed and not self._stalled() and len(self._queue) + n <= self._max_queue
            if queued:
                self._queue.extend([(seq, table, r, seg) for r in rows])
                depth = len(self._queue)
        if queued:
            if depth >= self._batch_size:
                self._wake.set()
            return True
        if seg >= 0:  # already durable in the journal: its segment is replayed from the file
            assert self._journal is not None
            self._journal.abandon([seg])
            return True
        try:
            self._spill_rows(table, rows, sync=closed)
            if closed:
                self._close_spill()  # no thread left to replay it: let any process take it
        except Exception as exc:  # disk trouble too: memory is the last resort, never drop
            with self._lock:
                self._last_error = _describe(exc)
                self._queue.extend([(seq, table, r, -1) for r in rows])
        return True

    # -------------------------------------------------------------------------------- writer thread

    def _run(self) -> None:
        while True:
            try:
                self._cycle()
            except Exception as exc:  # a bug must not kill the thread; rows stay queued or spilled
                log.exception("log writer cycle failed")
                with self._lock:
                    self._last_error = _describe(exc)
                time.sleep(self._interval)
            with self._lock:
                if self._stop and not self._queue:
                    self._done_seq = self._seq
                    self._done_cv.notify_all()
                    return
            self._wake.wait(self._interval)
            self._wake.clear()

    def _cycle(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._done_seq = self._seq
                    self._done_cv.notify_all()
                    break
                per_tx = SQLITE_BATCHES_PER_TRANSACTION if self._engine.dialect.name == "sqlite" else 1
                n = min(self._batch_size * per_tx, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
            self._process(batch)
            self._sync_spill()  # callers' queue-full spills, even while the queue never empties
        self._sync_spill()
        if self._journal is not None and self._journal.maintain(self._rotate):
            with self._lock:  # a segment with rows that only its file holds: replay it
                self._replay_requested += 1
        now = time.monotonic()
        with self._lock:
            wanted = (
                self._replay_requested > self._replay_done
                or not self._healthy  # probe, so recovery is noticed without new traffic
                or now >= self._next_scan
                or (self._spill_pending > 0 and not self._queue)
            )
            may_try = (self._healthy or now >= self._retry_at) and now >= self._replay_retry_at
            request = self._replay_requested
        if wanted and may_try and not self._stop:
            self._replay(request)

    def _process(self, batch: list[_Entry]) -> None:
        last_seq = batch[-1][0]
        try:
            with self._lock:
                attempt = self._healthy or time.monotonic() >= self._retry_at
            if attempt:
                with self._lock:
                    self._busy_since = time.monotonic()
                try:
                    self._write_batch(batch)
                finally:
                    with self._lock:
                        self._busy_since = None
            else:
                self._shelve(batch)
        except Exception as exc:
            log.exception("log writer could not write or spill a batch")
            with self._lock:
                self._last_error = _describe(exc)
            try:  # rows already written are harmless to spill again: replay is idempotent
                self._shelve(batch)
            except Exception:  # the spill file failed too: keep the rows in memory and back off
                with self._lock:
                    self._queue.extendleft(reversed(batch))
                time.sleep(min(self._max_backoff, 1.0))
                return
        with self._lock:
            done = last_seq - 1 if self._queue and self._queue[0][0] == last_seq else last_seq
            self._done_seq = max(self._done_seq, done)
            self._done_cv.notify_all()

    def _write_batch(self, batch: list[_Entry]) -> None:
        by_table: dict[str, list[Mapping[str, Any]]] = {DECISIONS: [], FEEDBACK: []}
        for entry in batch:
            by_table[entry[1]].append(entry[2])
        engine = self._engine
        try:
            with engine.begin() as conn:
                for table, rows in by_table.items():
                    if rows:
                        _insert_rows(conn, table, rows)
        except Exception as exc:
            if not _is_data_error(exc):
                self._on_trouble(exc)
                self._shelve(batch)
                return
            if self._journal is not None and any(e[3] >= 0 for e in batch):
                # journaled rows: written or rejected, or else replayed from their segment's file
                # (idempotent), so the isolation below need not track which segment each row is in
                for table, rows in by_table.items():
                    try:
                        self._count("written", self._insert_isolating(engine, table, rows))
                    except _Trouble as trouble:
                        self._on_trouble(trouble.cause)
                        self._shelve(batch)
                        return
                self._settle(batch)
                self._on_success()
                return
            for i, (table, rows) in enumerate(by_table.items()):
                try:
                    written = self._insert_isolating(engine, table, rows)
                except _Trouble as trouble:
                    self._on_trouble(trouble.cause)
                    self._spill_rows(table, trouble.unwritten, sync=True)
                    for later, later_rows in list(by_table.items())[i + 1 :]:
                        self._spill_rows(later, later_rows, sync=True)
                    return
                self._count("written", written)
            self._on_success()
            return
        self._count("written", len(batch))
        self._settle(batch)
        self._on_success()

    def _settle(self, batch: list[_Entry]) -> None:
        if self._journal is None:
            return
        counts: dict[int, int] = {}
        for entry in batch:
            if entry[3] >= 0:
                counts[entry[3]] = counts.get(entry[3], 0) + 1
        if counts:
            self._journal.settle(counts)

    def _shelve(self, entries: list[_Entry]) -> None:
        """Rows that will not be written from memory now: journaled ones wait in their segment's file
        (released for replay), the others go to the spill file."""
        if self._journal is not None:
            self._journal.abandon({e[3] for e in entries if e[3] >= 0})
        self._spill_entries([e for e in entries if e[3] < 0])

    def _insert_isolating(self, engine: Engine, table: str, rows: list[Mapping[str, Any]]) -> int:
        """Insert ``rows`` in chunks, bisecting around rows the database refuses (those are
        rejected). Returns the rows written; raises :class:`_Trouble` on database trouble."""
        written = 0
        stack = [rows] if rows else []
        while stack:
            chunk = stack.pop()
            try:
                with engine.begin() as conn:
                    _insert_rows(conn, table, chunk)
                written += len(chunk)
            except Exception as exc:
                if not _is_data_error(exc):
                    unwritten = list(chunk)
                    for rest in reversed(stack):
                        unwritten.extend(rest)
                    raise _Trouble(exc, unwritten) from exc
                if len(chunk) == 1:
                    self._reject(table, chunk[0], exc)
                else:
                    mid = len(chunk) // 2
                    stack.append(chunk[mid:])
                    stack.append(chunk[:mid])
        return written

    def _on_success(self) -> None:
        with self._lock:
            if not self._healthy:
                log.warning("log database reachable again; replaying spill files")
                self._healthy = True
                self._replay_requested += 1
            self._backoff = 0.0

    def _on_trouble(self, exc: BaseException) -> None:
        with self._lock:
            if self._healthy:
                log.warning("log database failing, spilling to %s: %s", self._dir, _describe(exc))
            self._healthy = False
            self._last_error = _describe(exc)
            self._backoff = min(self._max_backoff, self._backoff * 2 if self._backoff else 0.1)
            self._retry_at = time.monotonic() + self._backoff

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self._counts[key] += n

    # ------------------------------------------------------------------------------------- spilling

    def _open_own_spill(self) -> int:
        """Open and lock ``spill-<pid>.jsonl`` (called with the spill lock held)."""
        if self._spill_fd is not None:
            return self._spill_fd
        path = self._dir / f"spill-{os.getpid()}.jsonl"
        attempts = 0
        while True:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # a replayer claiming an orphan of the same name (gone in microseconds), or another
                # LogWriter of this process on the same spill_dir (then take a name of our own)
                os.close(fd)
                attempts += 1
                if attempts >= 20:
                    path = self._dir / f"spill-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
                time.sleep(0.001)
                continue
            if _same_file(fd, path):
                break
            os.close(fd)  # renamed away between our open and our lock
        _fsync_dir(self._dir)
        self._spill_fd, self._spill_path = fd, path
        return fd

    def _spill_rows(self, table: str, rows: list[Mapping[str, Any]], *, sync: bool) -> None:
        if not rows:
            return
        try:
            line = encode_spill_line(table, list(rows))
        except (TypeError, ValueError):
            good = []
            for row in rows:
                try:
                    encode_spill_line(table, [row])
                    good.append(row)
                except (TypeError, ValueError) as exc:
                    self._reject(table, row, exc)
            if not good:
                return
            rows, line = good, encode_spill_line(table, good)
        with self._spill_lock:
            fd = self._open_own_spill()
            _write_all(fd, line)
            if sync:
                os.fsync(fd)
            else:
                self._spill_unsynced = True
            self._spill_pending += len(rows)
        self._count("spilled", len(rows))

    def _spill_entries(self, entries: list[_Entry]) -> None:
        by_table: dict[str, list[Mapping[str, Any]]] = {DECISIONS: [], FEEDBACK: []}
        for entry in entries:
            by_table[entry[1]].append(entry[2])
        for table, rows in by_table.items():
            self._spill_rows(table, rows, sync=True)

    def _sync_spill(self) -> None:
        with self._spill_lock:
            if self._spill_unsynced and self._spill_fd is not None:
                os.fsync(self._spill_fd)
            self._spill_unsynced = False

    def _reject(self, table: str, row: Mapping[str, Any], exc: BaseException) -> None:
        def fallback(obj: Any) -> Any:
            try:
                return _spill_default(obj)
            except TypeError:
                return repr(obj)

        record = {"table": table, "error": _describe(exc), "row": row}
        line = json.dumps(record, default=fallback, separators=(",", ":")) + "\n"
        self._append_rejected(line.encode("utf-8"))
        with self._lock:
            self._counts["rejected"] += 1
            self._last_error = _describe(exc)
        log.error("log row refused by the database (kept in rejected file): %s", _describe(exc))

    def _append_rejected(self, data: bytes) -> None:
        fd = os.open(self._dir / f"rejected-{os.getpid()}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------ replaying

    def _rotate_own(self) -> tuple[Path, int] | None:
        with self._spill_lock:
            if self._spill_fd is None or self._spill_path is None:
                return None
            fd, path = self._spill_fd, self._spill_path
            if os.fstat(fd).st_size == 0:
                return None
            os.fsync(fd)
            target = self._dir / f"replay-{os.getpid()}-{uuid.uuid4().hex}.jsonl"
            os.rename(path, target)
            self._spill_fd = self._spill_path = None
            self._spill_unsynced = False
            self._spill_pending = 0
            return target, fd  # still locked by fd

    def _claim_others(self) -> list[tuple[Path, int]]:
        for staging in self._dir.glob(".journal-*.new"):  # a journal killed while opening a segment
            try:  # (empty: nothing is written before the rename); a live one renames it in microseconds
                if time.time() - staging.stat().st_mtime > 60:
                    staging.unlink()
            except FileNotFoundError:
                pass
        claimed = []
        names = (sorted(self._dir.glob("spill-*.jsonl")) + sorted(self._dir.glob("journal-*.jsonl"))
                 + sorted(self._dir.glob("replay-*.jsonl")))
        for path in names:
            if path == self._spill_path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its owner is alive (or another process is replaying it)
                os.close(fd)
                continue
            if not _same_file(fd, path):  # renamed or deleted before we got the lock
                os.close(fd)
                continue
            if not path.name.startswith("replay-"):
                target = self._dir / f"replay-{os.getpid()}-{uuid.uuid4().hex}.jsonl"
                os.rename(path, target)
                path = target
            claimed.append((path, fd))
        return claimed

    def _replay(self, request: int) -> None:
        with self._lock:
            healthy = self._healthy
        if not healthy:
            try:  # cheap probe first: no file shuffling while the database is still down
                with self._engine.connect() as conn:
                    conn.execute(sa.select(1))
            except Exception as exc:
                self._on_trouble(exc)
                return
            self._on_success()
        claimed: list[tuple[Path, int]] = []
        own = self._rotate_own()
        if own is not None:
            claimed.append(own)
        claimed.extend(self._claim_others())
        ok = True
        for path, fd in claimed:
            try:
                if ok:
                    ok = self._replay_file(path)
            except OSError as exc:  # the local disk (a rejected record could not be kept): back off
                ok = False
                log.error("replay of %s stopped by a local disk error; retrying later: %s", path.name, exc)
                with self._lock:
                    self._last_error = _describe(exc)
                    self._replay_backoff = min(self._max_backoff, self._replay_backoff * 2 or 0.1)
                    self._replay_retry_at = time.monotonic() + self._replay_backoff
            finally:
                os.close(fd)  # deleted when replayed; else left for a later attempt
        if claimed:
            _fsync_dir(self._dir)
        with self._lock:
            if ok:
                self._replay_backoff = 0.0
                self._replay_done = max(self._replay_done, request)
                self._next_scan = time.monotonic() + self._rescan
            self._done_cv.notify_all()

    def _replay_file(self, path: Path) -> bool:
        engine = self._engine
        pending: dict[str, list[Mapping[str, Any]]] = {DECISIONS: [], FEEDBACK: []}
        try:
            with open(path, "rb") as f:
                for raw in f:
                    if not raw.strip():
                        continue
                    try:
                        table, rows = decode_spill_line(raw)
                    except ValueError as exc:  # torn last line of a crashed process
                        self._reject_raw(raw, exc)
                        continue
                    pending[table].extend(rows)
                    if len(pending[table]) >= self._batch_size:
                        self._count("replayed", self._insert_isolating(engine, table, pending[table]))
                        pending[table] = []
            for table, left in pending.items():
                self._count("replayed", self._insert_isolating(engine, table, left))
        except _Trouble as trouble:
            self._on_trouble(trouble.cause)
            return False
        os.unlink(path)
        self._on_success()
        return True

    def _reject_raw(self, raw: bytes, exc: BaseException) -> None:
        """Keep an undecodable line (the torn tail of a crashed process's file: never acknowledged,
        since its fsync had not returned) for inspection; if the disk cannot take it, log it and go
        on, so that one torn line never holds up the rest of the file."""
        record = {"table": None, "error": _describe(exc), "raw": raw.decode("utf-8", "replace")}
        with self._lock:
            self._counts["rejected"] += 1
        try:
            self._append_rejected((json.dumps(record) + "\n").encode("utf-8"))
        except OSError as err:
            log.error("torn spill line skipped (%d bytes; not kept: %s)", len(raw), err)


def _close_at_exit(ref: weakref.ref[LogWriter]) -> None:
    writer = ref()
    if writer is not None:
        writer.close(timeout=5.0)
