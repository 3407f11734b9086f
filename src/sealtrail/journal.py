"""A spool in an append-only file: the fast durable queue of the best-effort mode.

:class:`JournalSpool` has the interface of :class:`sealtrail.spool.Spool` (``put``,
``peek``, ``ack``, ``reject``, ``depth``, ``oldest``, ``rejected``) and the same
guarantees, at the cost of one ``write()`` per ``put`` instead of a SQLite transaction:

* **Durable when ``put`` returns**: the bytes are in the kernel when ``write()`` returns,
  so they survive a crash of the process (``synchronous="NORMAL"``, what logging to a file
  gives); ``"FULL"`` adds an ``fsync`` for a power cut.
* **All or none**: a ``put`` is one ``write()`` of its frames, the first marked *start*
  and the last *end*; a reader takes a group only once its end frame is there and every
  frame's CRC holds. A write cut short (the process killed in the middle, a full disk) is
  a group that never ends: it was never acknowledged to the caller, and the reader skips
  it, finding the next frame by its magic and CRC.
* **One order for every process**: the directory holds one live file, ``journal``, that
  every process appends to with ``O_APPEND`` (the kernel serialises appends to one file,
  so frames of concurrent puts never interleave). The one deliverer (the holder of
  ``<dir>.lock``, as for the SQLite spool) reads it in order and keeps its position in
  ``ack``.
* **Bounded disk**: once everything in ``journal`` is delivered and it has grown past
  ``rotate_bytes``, the deliverer takes an exclusive ``flock`` on it (writers hold a
  shared one for the length of their ``write()``), checks again that nothing was added,
  and unlinks it; writers that still hold the old file see it unlinked under their lock
  and reopen ``journal``, which the next put creates.
* **Refused events** are appended to ``rejected.jsonl`` with the reason, as the SQLite
  spool moves them to its ``rejected`` table.
* **A local filesystem**: the order and the all-or-none put rest on ``O_APPEND`` being
  atomic and on ``flock``, which a local filesystem gives and NFS does not promise. The
  resynchronisation after damage relies on bodies being canonical JSON (no raw bytes
  1-3), as the event envelope guarantees.

Frame layout (little-endian): ``magic b"\\xa7J"``, flags (1 = start, 2 = end), id length
(u8), body length (u32), CRC-32 of everything after the CRC (u32), queued time in µs
since the epoch (i64), then the id and the canonical body. The file starts with a
32-byte header: ``b"SEALJRN1"`` and a random 64-bit generation, which ``ack`` names with
the delivered offset so that a position is never applied to a newer file.

This is the pure file format and its locking; :class:`~sealtrail.spool.SpooledSink` does
the delivering.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import secrets
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final, Literal

from sealtrail._exceptions import StorageError

__all__ = ["JournalSpool"]

log = logging.getLogger("sealtrail.spool")

FILE_MAGIC: Final = b"SEALJRN1"
_FILE_HEADER = struct.Struct("<8sQQ8x")  # magic, generation, base, reserved
FRAME_MAGIC: Final = b"\xa7J"
_FRAME = struct.Struct("<2sBBIIq")  # magic, flags, id length, body length, crc, queued µs
_CRC_PREFIX = struct.Struct("<BBI")  # the CRC covers flags, id length, body length, queued
_ACK = struct.Struct("<QQQ")  # generation, delivered offset, base of that generation
START: Final = 1
END: Final = 2
#: No frame is larger (a canonical event is bounded far below; a larger length is damage).
MAX_BODY: Final = 64 * 1024 * 1024
_READ_CHUNK: Final = 1 << 20
_FIRST_READ: Final = 4096  # reading grows from here to _READ_CHUNK (oldest() needs one frame)


def _frame(flags: int, event_id: bytes, body: bytes, queued: int) -> bytes:
    head = _CRC_PREFIX.pack(flags, len(event_id), len(body)) + queued.to_bytes(
        8, "little", signed=True
    )
    crc = zlib.crc32(body, zlib.crc32(event_id, zlib.crc32(head)))
    return _FRAME.pack(FRAME_MAGIC, flags, len(event_id), len(body), crc, queued) + event_id + body


class _Frame:
    __slots__ = ("body", "end", "event_id", "flags", "queued", "start")

    def __init__(
        self, start: int, end: int, flags: int, event_id: str, body: bytes, queued: int
    ) -> None:
        self.start, self.end, self.flags = start, end, flags
        self.event_id, self.body, self.queued = event_id, body, queued


def _parse(buf: bytes | memoryview, at: int, base: int) -> _Frame | Literal[False] | None:
    """The frame at ``buf[at:]``: a :class:`_Frame`, ``None`` if ``buf`` ends inside it
    (it may still be being written), ``False`` if the bytes there are not a frame."""
    if len(buf) - at < _FRAME.size:
        return None if bytes(buf[at : at + 2]) == FRAME_MAGIC[: len(buf) - at] else False
    magic, flags, idlen, bodylen, crc, queued = _FRAME.unpack_from(buf, at)
    if magic != FRAME_MAGIC or flags & ~(START | END) or bodylen > MAX_BODY or idlen == 0:
        return False
    stop = at + _FRAME.size + idlen + bodylen
    if stop > len(buf):
        return None
    event_id = bytes(buf[at + _FRAME.size : at + _FRAME.size + idlen])
    body = bytes(buf[at + _FRAME.size + idlen : stop])
    head = bytes(buf[at + 2 : at + 8]) + bytes(buf[at + 12 : at + 20])
    check = zlib.crc32(body, zlib.crc32(event_id, zlib.crc32(head)))
    if check != crc:
        return False
    try:
        text = event_id.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _Frame(base + at, base + stop, flags, text, body, queued)


_OPEN: weakref.WeakSet[JournalSpool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock another thread held at fork() stays held in the child, where that thread does
    # not exist. The descriptors are fine to share: every writer appends to the same file.
    for spool in list(_OPEN):
        spool._write_lock = threading.Lock()
        spool._read_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class JournalSpool:
    """A durable FIFO of ``(event id, canonical body)`` in a directory (created 0700, its
    files 0600: they hold events). Thread-safe; any number of processes may ``put``; one
    at a time (the holder of ``<dir>.lock``) may ``peek``/``ack``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        rotate_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise StorageError(f"spool synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.fsync = synchronous.upper() == "FULL"
        self.rotate_bytes = rotate_bytes
        self._journal = self.path / "journal"
        self._ack_path = self.path / "ack"
        self._rejected_path = self.path / "rejected.jsonl"
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._wfd: int | None = None
        self._rfd: int | None = None
        self._generation = 0
        self._base = 0  # n = base + the end offset of the item's frame
        self._position = 0  # delivered up to here in the generation read
        self._counted = (0, 0, 0)  # (from, to, frames in between)
        _OPEN.add(self)
        try:
            if self.path.exists() and not self.path.is_dir():
                raise StorageError(f"cannot open the spool {self.path}: not a directory")
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._remove_stale_headers()
            self._open_writer()
        except OSError as exc:
            raise StorageError(f"cannot open the spool {self.path}: {exc}") from exc

    # -- the live file -----------------------------------------------------------------------
    def _open_live(self, flags: int) -> int:
        """Open ``journal``, creating it (with its header, atomically) if it is missing."""
        while True:
            try:
                fd = os.open(self._journal, flags)
            except FileNotFoundError:
                self._create_live()
                continue
            try:
                self._read_header(fd)
            except BaseException:
                os.close(fd)
                raise
            return fd

    def _create_live(self) -> None:
        tmp = self.path / f".journal.{os.getpid()}.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Numbers go on from the file before: the last position acknowledged in it (a
            # file is retired only once delivered to its end).
            _, offset, base = self._read_ack()
            header = _FILE_HEADER.pack(FILE_MAGIC, secrets.randbits(64), base + offset)
            os.write(fd, header)
            os.fsync(fd)
            with contextlib.suppress(FileExistsError):  # another process was first: fine
                os.link(tmp, self._journal)
                if self.fsync:  # the file's name must survive a power cut too
                    directory = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(directory)
                    finally:
                        os.close(directory)
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)

    def _remove_stale_headers(self) -> None:
        """A process that died between writing a new file's header and linking it left the
        header behind (never linked, so it holds no events)."""
        for stale in self.path.glob(".journal.*"):
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 60:
                    stale.unlink()

    def _read_ack(self) -> tuple[int, int, int]:
        """``ack``: (generation, delivered offset in it, its base), zeros if there is none."""
        try:
            raw = self._ack_path.read_bytes()
        except FileNotFoundError:
            return 0, 0, 0
        if len(raw) != _ACK.size:
            # Where delivery stood is lost; from the start is safe (the ledger stores each
            # event id once, so what was delivered already is not stored twice).
            log.error(
                "audit spool %s: its ack file is damaged (%d bytes); delivering the journal "
                "again from its start",
                self.path,
                len(raw),
            )
            return 0, 0, 0
        generation, offset, base = _ACK.unpack(raw)
        return int(generation), int(offset), int(base)

    def _read_header(self, fd: int) -> tuple[int, int]:
        head = os.pread(fd, _FILE_HEADER.size, 0)
        if len(head) != _FILE_HEADER.size or head[:8] != FILE_MAGIC:
            raise StorageError(
                f"cannot open the spool {self.path}: its journal is not a Sealtrail journal"
            )
        _, generation, base = _FILE_HEADER.unpack(head)
        return int(generation), int(base)

    def _open_writer(self) -> None:
        self._wfd = self._open_live(os.O_RDWR | os.O_APPEND)

    # -- writing -------------------------------------------------------------------------
    def put(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Queue ``(event id, canonical body)`` pairs, all or none, durably."""
        batch = list(items)
        if not batch:
            return
        queued = time.time_ns() // 1000
        last = len(batch) - 1
        parts = []
        for i, (event_id, body) in enumerate(batch):
            raw_id = event_id.encode("utf-8")
            if not 0 < len(raw_id) < 256 or len(body) > MAX_BODY:
                raise StorageError(
                    f"spool {self.path}: cannot queue event {event_id!r}: its id must be 1-255 "
                    f"bytes and its body at most {MAX_BODY} bytes"
                )
            flags = (START if i == 0 else 0) | (END if i == last else 0)
            parts.append(_frame(flags, raw_id, body, queued))
        data = b"".join(parts)
        with self._write_lock:
            try:
                self._append(data)
            except OSError as exc:
                raise StorageError(f"spool {self.path}: cannot queue events: {exc}") from exc

    def _append(self, data: bytes) -> None:
        while True:
            if self._wfd is None:
                self._open_writer()
            fd = self._wfd
            assert fd is not None
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                if os.fstat(fd).st_nlink == 0:  # delivered and retired: write to the new one
                    self._wfd = None
                    os.close(fd)
                    continue
                written = os.write(fd, data)
                if written != len(data):  # a full disk: the torn group is skipped on reading
                    raise OSError(f"short write ({written} of {len(data)} bytes)")
                if self.fsync:
                    os.fsync(fd)
                return
            finally:
                if self._wfd == fd:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    # -- reading (the deliverer) -----------------------------------------------------------
    def _reader(self) -> int:
        """The read descriptor on the live file, with ``_position`` set to what ``ack``
        says was delivered in it (read again each time: the deliverer may be another
        process)."""
        if self._rfd is not None and os.fstat(self._rfd).st_nlink == 0:
            os.close(self._rfd)  # retired by a deliverer in another process
            self._rfd = None
        if self._rfd is None:
            self._rfd = self._open_live(os.O_RDONLY)
            self._generation, self._base = self._read_header(self._rfd)
            self._counted = (0, 0, 0)
        position = _FILE_HEADER.size
        generation, offset, _ = self._read_ack()
        if generation == self._generation and offset >= _FILE_HEADER.size:
            position = offset
        self._position = position
        return self._rfd

    def _frames(self, fd: int, start: int) -> Iterator[_Frame]:
        """The frames of whole groups from ``start`` on, in order. Damage (a write cut
        short, then more writes after it) is skipped and logged; reading stops at the end,
        or at an unfinished group or frame with nothing valid after it (a put in progress,
        or the torn tail of one whose process died)."""
        group: list[_Frame] = []
        resuming = True  # ``start`` may be inside a group, after items acknowledged singly
        base, buf, at = start, b"", 0
        chunk = _FIRST_READ
        while True:
            frame = _parse(buf, at, base)
            if frame is None:  # the buffer ends inside a frame: read on
                more = os.pread(fd, chunk, base + len(buf))
                chunk = min(chunk * 4, _READ_CHUNK)
                if more:
                    buf, base, at = buf[at:] + more, base + at, 0
                    continue
                if at == len(buf):
                    return
                # The file ends inside a frame: a put in progress, unless a whole frame
                # follows (a torn write's header can claim more bytes than it wrote, and
                # no whole frame can hide inside a put's own bytes: its bodies are
                # canonical JSON, where the flag bytes 1-3 cannot occur unescaped).
            if frame is None or frame is False:
                damaged = base + at
                found = self._resync(fd, damaged)
                if found is None:
                    return
                log.error(
                    "audit spool %s: %d damaged bytes at offset %d skipped (a write cut short)",
                    self.path,
                    found - damaged,
                    damaged,
                )
                group = []
                resuming = False
                base, buf, at = found, b"", 0
                continue
            at = frame.end - base
            if resuming and not frame.flags & START:
                group = [frame]
            elif frame.flags & START:
                if group:
                    log.error(
                        "audit spool %s: an unfinished put of %d events at offset %d skipped "
                        "(a write cut short: it was never acknowledged)",
                        self.path,
                        len(group),
                        group[0].start,
                    )
                group = [frame]
            elif group:
                group.append(frame)
            else:  # the rest of a group whose start was damaged: never acknowledged
                continue
            resuming = False
            if frame.flags & END:
                yield from group
                group = []

    def _resync(self, fd: int, damaged: int) -> int | None:
        """The offset of the first whole frame after damage at ``damaged``, or None."""
        offset = damaged + 1
        while True:
            chunk = os.pread(fd, _READ_CHUNK, offset)
            if len(chunk) < len(FRAME_MAGIC):
                return None
            i = chunk.find(FRAME_MAGIC)
            while i >= 0:
                candidate = offset + i
                header = os.pread(fd, _FRAME.size, candidate)
                if len(header) == _FRAME.size:
                    _, _, idlen, bodylen, _, _ = _FRAME.unpack(header)
                    if bodylen <= MAX_BODY:
                        whole = os.pread(fd, _FRAME.size + idlen + bodylen, candidate)
                        if isinstance(_parse(whole, 0, candidate), _Frame):
                            return candidate
                i = chunk.find(FRAME_MAGIC, i + 1)
            offset += len(chunk) - 1

    def _count(self, fd: int, start: int, stop: int | None) -> tuple[int, int]:
        """How many frames of whole groups lie from ``start`` (to ``stop``), and the end of
        the last whole group read."""
        count, end = 0, start
        for frame in self._frames(fd, start):
            if stop is not None and frame.end > stop:
                break
            count += 1
            if frame.flags & END:
                end = frame.end
        return count, end

    def peek(self, limit: int) -> list[tuple[int, str, bytes]]:
        """The oldest ``limit`` queued items, ``(n, id, body)``, in queue order."""
        with self._read_lock:
            try:
                fd = self._reader()
                frames = list(itertools.islice(self._frames(fd, self._position), limit))
            except OSError as exc:
                raise StorageError(f"spool {self.path}: cannot read: {exc}") from exc
        return [(self._base + f.end, f.event_id, f.body) for f in frames]

    def ack(self, upto: int) -> None:
        """Forget every item up to and including ``n = upto`` (delivered)."""
        with self._read_lock:
            try:
                fd = self._reader()
                offset = upto - self._base
                if offset <= self._position:
                    return
                size = os.fstat(fd).st_size
                if offset > size:  # "everything": up to the last whole group
                    offset = self._count(fd, self._position, None)[1]
                self._save_position(offset)
                self._maybe_rotate(fd)
            except OSError as exc:
                raise StorageError(f"spool {self.path}: cannot acknowledge: {exc}") from exc

    def _save_position(self, offset: int) -> None:
        self._position = offset
        tmp = self._ack_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _ACK.pack(self._generation, offset, self._base))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._ack_path)

    def _maybe_rotate(self, fd: int) -> None:
        if self._position < self.rotate_bytes:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a put is writing: next time
        try:
            if os.fstat(fd).st_size != self._position:
                return  # more was queued: deliver it first
            self._journal.unlink()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self._rfd = None

    def reject(self, n: int, reason: str) -> None:
        """Set item ``n`` aside in ``rejected.jsonl`` (the target refuses it for good) and
        forget it. Only the oldest item may be rejected: the journal is read in order."""
        from sealtrail.event import utc_now

        frame = self._oldest()
        if frame is None or self._base + frame.end != n:
            raise StorageError(f"spool {self.path}: only the oldest queued event can be set aside")
        line = json.dumps(
            {
                "n": n,
                "id": frame.event_id,
                "body": frame.body.decode("utf-8", "replace"),
                "queued": _rfc3339(frame.queued),
                "rejected": utc_now(),
                "reason": reason,
            },
            ensure_ascii=True,
        )
        try:
            fd_r = os.open(self._rejected_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd_r, line.encode("ascii") + b"\n")
                if self.fsync:
                    os.fsync(fd_r)
            finally:
                os.close(fd_r)
        except OSError as exc:
            raise StorageError(
                f"spool {self.path}: cannot set aside a rejected event: {exc}"
            ) from exc
        self.ack(n)

    # -- observing -------------------------------------------------------------------------
    def depth(self) -> int:
        """Events queued and not yet delivered (counted incrementally)."""
        with self._read_lock:
            try:
                fd = self._reader()
                first, last, count = self._counted
                if self._position != first:
                    if self._position >= last:
                        first = last = self._position
                        count = 0
                    else:
                        count -= self._count(fd, first, self._position)[0]
                        first = self._position
                added, last = self._count(fd, last, None)
                count += added
                self._counted = (first, last, count)
            except OSError as exc:
                raise StorageError(f"spool {self.path}: cannot read: {exc}") from exc
        return count

    def oldest(self) -> str | None:
        """When the oldest queued item was queued (RFC 3339 UTC), or None if empty."""
        frame = self._oldest()
        return None if frame is None else _rfc3339(frame.queued)

    def _oldest(self) -> _Frame | None:
        with self._read_lock:
            try:
                fd = self._reader()
                return next(self._frames(fd, self._position), None)
            except OSError as exc:
                raise StorageError(f"spool {self.path}: cannot read: {exc}") from exc

    def rejected(self) -> list[dict[str, Any]]:
        try:
            text = self._rejected_path.read_text("utf-8")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            if line.strip():
                item = json.loads(line)
                item["body"] = item["body"].encode("utf-8")
                out.append(item)
        return out

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            for fd in (self._wfd, self._rfd):
                if fd is not None:
                    os.close(fd)
            self._wfd = self._rfd = None


def _rfc3339(micros: int) -> str:
    seconds, fraction = divmod(micros, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:06d}Z"
