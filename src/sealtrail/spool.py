"""Delivery that loses nothing: a durable local spool between the application and its trail.

DESIGN.md I10: if the trail's store is unreachable, events wait in a local file and are
delivered, in the order they were recorded, when it returns.

* :class:`Spool` is a SQLite file, and :class:`~sealtrail.journal.JournalSpool` an
  append-only journal in a directory (the default: a ``put`` is one ``write()``, not a
  transaction); :func:`open_spool` picks by path. Either is a FIFO of validated,
  redacted, canonical event bodies. A ``put`` is durable when it returns (against a crash
  of the process with the default ``synchronous="NORMAL"``, against a power cut too with
  ``"FULL"``). Nothing is held in memory but the batch being delivered, so a long outage
  costs disk, not RAM.
* :class:`SpooledSink` is what a :class:`~sealtrail.trail.Trail` records into in the
  *best-effort* mode: ``append`` spools the event and returns at once with a pending
  receipt; a background thread delivers batches to the target ledger (opened lazily, so
  the application starts while its trail is down; with ``deliver=False`` another process
  delivers, e.g. ``sealtrail deliver``), retrying with exponential backoff and
  full jitter. Delivery is at least once; the target stores each event id once (the
  ledger answers a repeated id with the original receipt), so a crash between the
  target's commit and the spool's acknowledgement costs a duplicate send, never a
  duplicate event. The backlog is counted and exposed (:meth:`SpooledSink.stats`, a
  Prometheus text exposition in :meth:`SpooledSink.metrics`), and an alert (a callback
  and a WARNING on the ``sealtrail.spool`` logger) fires when it grows past a size or
  age, once until it drains again.
* The *fail-closed* mode needs no spool: ``record`` appends to the ledger directly and
  raises when it cannot, so the protected operation fails with it.

One delivering thread per spool file: a process holds an exclusive lock on
``<spool>.lock`` while it delivers, so several worker processes may share a spool (each
enqueues; one delivers) without reordering it. A spooled body that the target refuses for
good (invalid, or its id stored with other content) is set aside with the reason (the
SQLite spool's ``rejected`` table, the journal's ``rejected.jsonl``), counted, logged at
ERROR, and never blocks the events behind it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Final

from sealtrail._exceptions import (
    ConflictError,
    InvalidEvent,
    SealtrailError,
    StorageError,
)
from sealtrail._metrics import exposition
from sealtrail.event import DEFAULT_LIMITS, Limits, parse_event, prepare_canonical, utc_now
from sealtrail.journal import JournalSpool
from sealtrail.ledger import AppendResult, Ledger

__all__ = ["Backoff", "Spool", "SpoolStats", "SpooledSink", "open_spool", "start_deliverer"]

log = logging.getLogger("sealtrail.spool")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS queue (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    queued TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    n INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    queued TEXT NOT NULL,
    rejected TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""


class Spool:
    """A durable FIFO of event bodies in one SQLite file (created 0600: it holds events).

    Thread-safe; any number of processes may ``put`` into the same file.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise StorageError(f"spool synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=60.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the spool {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"spool {self.path}: cannot {doing}: {exc}") from exc

    def put(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Queue ``(event id, canonical body)`` pairs, all or none, durably."""
        now = utc_now()
        with self._write("queue events") as db:
            db.executemany(
                "INSERT INTO queue(id, body, queued) VALUES (?, ?, ?)",
                [(i, b, now) for i, b in items],
            )

    def peek(self, limit: int) -> list[tuple[int, str, bytes]]:
        """The oldest ``limit`` queued items, ``(n, id, body)``, in queue order."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT n, id, body FROM queue ORDER BY n LIMIT ?", (limit,)
                ).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"spool {self.path}: cannot read: {exc}") from exc
        return [(int(n), str(i), bytes(b)) for n, i, b in rows]

    def ack(self, upto: int) -> None:
        """Forget every item up to and including ``n = upto`` (delivered)."""
        with self._write("acknowledge delivered events") as db:
            db.execute("DELETE FROM queue WHERE n <= ?", (upto,))

    def reject(self, n: int, reason: str) -> None:
        """Move item ``n`` to the ``rejected`` table (the target refuses it for good)."""
        with self._write("set aside a rejected event") as db:
            db.execute(
                "INSERT OR REPLACE INTO rejected(n, id, body, queued, rejected, reason) "
                "SELECT n, id, body, queued, ?, ? FROM queue WHERE n = ?",
                (utc_now(), reason, n),
            )
            db.execute("DELETE FROM queue WHERE n = ?", (n,))

    def depth(self) -> int:
        value = self._scalar("SELECT count(*) FROM queue")
        return value if isinstance(value, int) else 0

    def oldest(self) -> str | None:
        """When the oldest queued item was queued (RFC 3339 UTC), or None if empty."""
        value = self._scalar("SELECT queued FROM queue ORDER BY n LIMIT 1")
        return None if value is None else str(value)

    def rejected(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT n, id, body, queued, rejected, reason FROM rejected ORDER BY n"
            ).fetchall()
        keys = ("n", "id", "body", "queued", "rejected", "reason")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def _scalar(self, sql: str) -> object:
        with self._lock:
            try:
                row = self._db.execute(sql).fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"spool {self.path}: cannot read: {exc}") from exc
        return None if row is None else row[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_spool(
    path: str | os.PathLike[str], *, synchronous: str = "NORMAL"
) -> Spool | JournalSpool:
    """The spool at ``path``: a SQLite :class:`Spool` for a path ending in ``.db`` or an
    existing file, else a :class:`~sealtrail.journal.JournalSpool` directory (the faster
    one: a ``put`` is one ``write()`` instead of a SQLite transaction)."""
    where = Path(path)
    if where.suffix == ".db" or where.is_file():
        return Spool(where, synchronous=synchronous)
    return JournalSpool(where, synchronous=synchronous)


def start_deliverer(args: list[str], store: str | None) -> subprocess.Popen[bytes]:
    """``sealtrail ARGS --parent <this process> --quiet`` in a session of its own (a
    Ctrl-C meant for the application does not stop it mid-delivery), finding this very
    sealtrail package. The store URL goes in the environment, not the arguments: any
    local user can read a process's arguments, and the URL may hold a password."""
    package_root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}
    env.pop("SEALTRAIL_STORE", None)
    if store is not None:
        env["SEALTRAIL_STORE"] = store
    return subprocess.Popen(
        [sys.executable, "-m", "sealtrail.cli", *args, "--parent", str(os.getpid()), "--quiet"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


@dataclass
class Backoff:
    """Exponential backoff with full jitter: the n-th consecutive failure waits a uniformly
    random time in ``[0, min(cap, base * 2**n))`` (so many clients recovering from one
    outage do not retry in lockstep)."""

    base: float = 0.1
    cap: float = 30.0
    rng: random.Random | None = None

    def delay(self, failures: int) -> float:
        rng = self.rng or random
        return rng.uniform(0.0, min(self.cap, self.base * 2 ** min(failures, 32)))


@dataclass(frozen=True)
class SpoolStats:
    """What the spool has done since this process opened it, and what waits."""

    backlog: int
    oldest_age_seconds: float
    queued_total: int
    delivered_total: int
    duplicates_total: int
    rejected_total: int
    failures_total: int
    connected: bool
    last_error: str | None
    alerting: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _age(queued: str | None) -> float:
    if queued is None:
        return 0.0
    from datetime import UTC, datetime

    moment = datetime.strptime(queued, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - moment).total_seconds())


class SpooledSink:
    """Records into a :class:`Spool` and delivers it to a ledger from a background thread.

    ``open_target`` opens the target ledger; it is called lazily and again after every
    failure (with backoff), so the target may be down when the application starts.
    """

    def __init__(
        self,
        spool: Spool | JournalSpool,
        open_target: Callable[[], Ledger],
        *,
        batch: int = 500,
        backoff: Backoff | None = None,
        alert_backlog: int = 10_000,
        alert_age: float = 300.0,
        on_alert: Callable[[SpoolStats], None] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        idle_poll: float = 1.0,
        linger: float = 0.02,
        deliver: bool = True,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.spool = spool
        self._open_target = open_target
        self.batch = batch
        self.backoff = backoff or Backoff()
        self.alert_backlog = alert_backlog
        self.alert_age = alert_age
        self.on_alert = on_alert
        self.limits = limits
        self.idle_poll = idle_poll
        self.linger = linger
        self._target: Ledger | None = None
        self._wake = threading.Event()
        # Set while the deliverer waits for work: only then does a put wake it. Waking it on
        # every put would hand it the interpreter once per event (measured: a third of the
        # cost of a put); while it works or lingers it finds new events by itself.
        self._idle = False
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._closed = False
        self._delivering = threading.Lock()  # held while a batch is in flight
        self._counts_lock = threading.Lock()
        self._queued = self._delivered = self._duplicates = self._rejected = 0
        self._failures = 0
        self._streak = 0
        self._last_error: str | None = None
        self._alerting = False
        self._backlog = spool.depth()
        self._lockfile: IO[bytes] | None = None
        self.delivers = deliver
        #: A delivering process this sink started and stops (``connect(deliver="process")``).
        self.helper: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"sealtrail-spool:{spool.path.name}", daemon=True
        )
        if deliver:
            self._thread.start()

    # -- recording -------------------------------------------------------------------------
    def append(self, event: Mapping[str, Any]) -> AppendResult:
        return self.append_many([event])[0]

    def append_many(self, events: Iterable[Mapping[str, Any]]) -> list[AppendResult]:
        """Validate (an invalid event raises here, in the caller), then queue all the events
        durably in one transaction; the receipts are pending (no index yet)."""
        if self._closed:
            raise SealtrailError("this trail is closed")
        items = []
        for event in events:
            prepared, body = prepare_canonical(event, limits=self.limits)
            items.append((str(prepared["id"]), body))
        if not items:
            return []
        self.spool.put(items)
        with self._counts_lock:
            self._queued += len(items)
            self._backlog += len(items)
        if self._idle:
            self._wake.set()
        if not self._alerting and self.alert_backlog and self._backlog >= self.alert_backlog:
            self._check_alert()
        return [AppendResult(i, -1, b"", pending=True) for i, _ in items]

    # -- observing -------------------------------------------------------------------------
    def stats(self) -> SpoolStats:
        backlog = self.spool.depth()
        with self._counts_lock:
            self._backlog = backlog
            return SpoolStats(
                backlog=backlog,
                oldest_age_seconds=_age(self.spool.oldest()),
                queued_total=self._queued,
                delivered_total=self._delivered,
                duplicates_total=self._duplicates,
                rejected_total=self._rejected,
                failures_total=self._failures,
                connected=self._target is not None,
                last_error=self._last_error,
                alerting=self._alerting,
            )

    def metrics(self) -> str:
        """The stats in the Prometheus text exposition format."""
        s = self.stats()
        return exposition(
            "sealtrail_spool",
            {"spool": str(self.spool.path)},
            [
                ("backlog", "gauge", s.backlog, "Events waiting in the spool"),
                ("oldest_age_seconds", "gauge", s.oldest_age_seconds, "Age of the oldest event"),
                ("queued_total", "counter", s.queued_total, "Events queued"),
                ("delivered_total", "counter", s.delivered_total, "Events delivered"),
                ("duplicates_total", "counter", s.duplicates_total, "Deliveries already stored"),
                ("rejected_total", "counter", s.rejected_total, "Events the target refused"),
                ("failures_total", "counter", s.failures_total, "Failed delivery attempts"),
                ("connected", "gauge", int(s.connected), "Whether the target is open"),
                ("alerting", "gauge", int(s.alerting), "Whether the backlog alert is raised"),
            ],
        )

    def _check_alert(self) -> None:
        with self._counts_lock:
            backlog = self._backlog
            alerting = self._alerting
        if not alerting:
            over_size = self.alert_backlog > 0 and backlog >= self.alert_backlog
            over_age = (
                self.alert_age > 0 and backlog > 0 and _age(self.spool.oldest()) >= self.alert_age
            )
            if over_size or over_age:
                with self._counts_lock:
                    self._alerting = True
                stats = self.stats()
                log.warning(
                    "audit spool %s: %d events waiting, oldest %.0f s; last error: %s",
                    self.spool.path,
                    stats.backlog,
                    stats.oldest_age_seconds,
                    stats.last_error,
                )
                if self.on_alert is not None:
                    try:
                        self.on_alert(stats)
                    except Exception:
                        log.exception("the spool's alert callback failed")
        elif backlog <= self.alert_backlog // 2 and (
            backlog == 0 or _age(self.spool.oldest()) < self.alert_age / 2
        ):
            with self._counts_lock:
                self._alerting = False
            log.info("audit spool %s: backlog down to %d", self.spool.path, backlog)

    # -- delivering ------------------------------------------------------------------------
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is delivered (by this sink's thread, or with
        ``deliver=False`` by another process); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.spool.depth():
            if time.monotonic() >= deadline:
                return False
            if self.delivers and (not self._thread.is_alive() or self._paused.is_set()):
                return False
            if self.helper is not None and self.helper.poll() is not None:
                return False  # the delivering process is gone
            self._wake.set()
            time.sleep(0.01)
        with self._delivering:  # the last batch's bookkeeping is done too
            return True

    def pause(self) -> None:
        """Stop delivering; returns once the batch in flight, if any, is done. Events are
        still queued."""
        self._paused.set()
        with self._delivering:
            pass

    def resume(self) -> None:
        self._paused.clear()
        self._wake.set()

    def _run(self) -> None:
        small = True
        while not self._stop.is_set():
            if small and self.linger > 0:
                # Let a batch gather: the target's cost is per commit, so one event per
                # delivery would cost each event a commit (and the recording threads the
                # interpreter time it takes). Only after a small batch: under load, batches
                # follow each other at once and grow with the load.
                self._stop.wait(self.linger)
            try:
                with self._delivering:
                    delivered = 0 if self._paused.is_set() else self._deliver_once()
            except Exception as exc:  # the thread must survive anything to deliver later
                delivered = 0
                self._failed(exc)
                self._check_alert()  # an outage is when the backlog grows and ages
                delay = self.backoff.delay(self._streak)
                self._stop.wait(delay)
                continue
            self._check_alert()
            small = delivered < max(1, self.batch // 4)
            if not delivered:
                self._idle = True
                self._wake.wait(self.idle_poll)
                self._idle = False
                self._wake.clear()

    def _deliver_once(self) -> int:
        """Deliver one batch; how many events were delivered or set aside."""
        if not self._hold_lock():
            return 0
        rows = self.spool.peek(self.batch)
        if not rows:
            return 0
        target = self._connect()
        events: list[dict[str, Any]] = []
        for i, (n, event_id, body) in enumerate(rows):
            try:
                events.append(parse_event(body, limits=self.limits))
            except InvalidEvent as exc:
                # Only a damaged spool file gets here: the body was validated when queued.
                if i == 0:
                    self._reject(n, event_id, f"unreadable spooled event: {exc}")
                    return 1
                rows = rows[:i]  # deliver the ones before it first: the queue stays in order
                break
        try:
            # parse_event validated and prepared each one, as append_many would again.
            results = target.append_prepared(events)
        except (InvalidEvent, ConflictError):
            # One event spoils the batch: deliver one by one to find it.
            return self._deliver_singly(target, rows, events)
        self.spool.ack(rows[-1][0])
        self._delivered_batch(results)
        return len(rows)

    def _deliver_singly(
        self, target: Ledger, rows: Sequence[tuple[int, str, bytes]], events: list[dict[str, Any]]
    ) -> int:
        for (n, event_id, _body), event in zip(rows, events, strict=True):
            try:
                result = target.append(event)
            except (InvalidEvent, ConflictError) as exc:
                self._reject(n, event_id, f"the target refused the event: {exc}")
                continue
            self.spool.ack(n)
            self._delivered_batch([result])
        return len(rows)

    def _delivered_batch(self, results: Sequence[AppendResult]) -> None:
        with self._counts_lock:
            self._delivered += len(results)
            self._duplicates += sum(1 for r in results if r.duplicate)
            self._backlog = max(0, self._backlog - len(results))
            self._streak = 0
            self._last_error = None

    def _reject(self, n: int, event_id: str, reason: str) -> None:
        self.spool.reject(n, reason)
        with self._counts_lock:
            self._rejected += 1
            self._backlog = max(0, self._backlog - 1)
        log.error("audit spool %s: event %s set aside: %s", self.spool.path, event_id, reason)

    def _connect(self) -> Ledger:
        if self._target is None:
            self._target = self._open_target()
        return self._target

    def _failed(self, exc: BaseException) -> None:
        target, self._target = self._target, None
        if target is not None:
            with contextlib.suppress(Exception):
                target.close()
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        with self._counts_lock:
            self._failures += 1
            self._streak += 1
            first = self._streak == 1
            self._last_error = text
        if first:
            log.warning("audit spool %s: delivery failed, retrying: %s", self.spool.path, text)

    def _hold_lock(self) -> bool:
        """Take the spool's delivery lock (one deliverer per file), keeping it once held."""
        if self._lockfile is not None:
            return True
        lockfile = open(str(self.spool.path) + ".lock", "ab")  # noqa: SIM115 - held open
        try:
            fcntl.flock(lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lockfile.close()
            return False
        self._lockfile = lockfile
        return True

    # -- closing ---------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout``, then stop. What is left stays
        in the spool for the next process."""
        if self._closed:
            return
        self._closed = True
        if self.delivers:
            if not self._paused.is_set():
                self.flush(timeout)
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=max(1.0, timeout))
        if self.helper is not None:
            # It delivers what it can within the timeout; what is left waits in the spool.
            self.flush(timeout)
            self.helper.terminate()
            try:
                self.helper.wait(max(1.0, timeout))
            except subprocess.TimeoutExpired:
                self.helper.kill()
                self.helper.wait()
        if self._target is not None:
            with contextlib.suppress(Exception):
                self._target.close()
            self._target = None
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None
        self.spool.close()
