"""The journal spool (sealtrail.journal): an append-only file that any process appends to
and one deliverer reads. Its promises: a put is durable and all-or-none, one order for
every writer, torn and damaged writes skipped without taking good events with them, and
bounded disk through rotation that no concurrent writer can slip past."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealtrail import StorageError
from sealtrail.journal import END, START, JournalSpool, _frame
from sealtrail.spool import Spool, open_spool


def _ids(spool: JournalSpool, limit: int = 10_000) -> list[str]:
    return [i for _, i, _ in spool.peek(limit)]


def _drain(spool: JournalSpool) -> list[str]:
    got = []
    while rows := spool.peek(100):
        got += [i for _, i, _ in rows]
        spool.ack(rows[-1][0])
    return got


def test_a_durable_fifo_with_numbers_that_only_grow(tmp_path: Path) -> None:
    path = tmp_path / "s" / "spool"
    spool = JournalSpool(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE((path / "journal").stat().st_mode) == 0o600
    spool.put([(f"id{i}", f"body{i}".encode()) for i in range(5)])
    spool.put([("id5", b"body5")])
    spool.put([])  # nothing to do
    assert spool.depth() == 6
    assert _ids(spool, 3) == ["id0", "id1", "id2"]
    first = spool.peek(2)
    spool.ack(first[-1][0])
    spool.ack(first[0][0])  # acknowledging less than before changes nothing
    spool.close()
    again = JournalSpool(path)  # survives the process: reopened from the files
    assert _ids(again) == ["id2", "id3", "id4", "id5"]
    assert again.oldest() is not None and again.oldest().endswith("Z")  # type: ignore[union-attr]
    n = again.peek(1)[0][0]
    again.reject(n, "refused")
    assert [(r["id"], r["body"], r["reason"]) for r in again.rejected()] == [
        ("id2", b"body2", "refused")
    ]
    with pytest.raises(StorageError, match="only the oldest"):
        again.reject(again.peek(2)[1][0], "not the oldest")
    assert again.depth() == 3
    again.ack(10**9)  # everything
    assert again.depth() == 0 and again.oldest() is None and again.peek(5) == []
    again.put([("id6", b"x")])
    assert again.peek(1)[0][0] > n
    stat_rejected = (path / "rejected.jsonl").stat()
    assert stat.S_IMODE(stat_rejected.st_mode) == 0o600
    again.close()


def test_rotation_retires_a_delivered_file_and_numbers_go_on(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    writer = JournalSpool(path, rotate_bytes=300)
    reader = JournalSpool(path, rotate_bytes=300)
    seen: list[int] = []
    generations = set()
    for k in range(12):
        # the writer still holds the file the reader retired: it must notice and move on
        writer.put([(f"a{k}", b"x" * 60), (f"b{k}", b"y" * 60)])
        generations.add((path / "journal").read_bytes()[8:16])  # the file's header
        rows = reader.peek(10)
        assert [i for _, i, _ in rows] == [f"a{k}", f"b{k}"]
        seen += [n for n, _, _ in rows]
        reader.ack(rows[-1][0])
        assert reader.depth() == 0
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert len(generations) >= 4  # it did rotate, several times
    assert (path / "journal").stat().st_size < 300 + 200  # disk stays bounded


def test_rotation_waits_for_what_was_queued_after_the_last_delivery(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = JournalSpool(path, rotate_bytes=50)
    spool.put([("a", b"x" * 60)])
    rows = spool.peek(1)
    spool.put([("b", b"y")])  # queued between the read and the acknowledgement
    spool.ack(rows[-1][0])
    assert _ids(spool) == ["b"]  # not retired with the file


def test_every_cut_of_a_write_keeps_exactly_the_whole_puts_before_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process killed in the middle of ``write()`` leaves any prefix of its bytes: the
    reader returns the puts completed before the cut and nothing of the cut one, and a
    later put is found again after the debris."""
    path = tmp_path / "spool"
    spool = JournalSpool(path)
    puts = [[("p0", b"zero")], [("p1a", b"one-a"), ("p1b", b"one-b"), ("p1c", b"one-c")]]
    puts += [[("p2", b"two" * 20)]]
    ends = []
    for batch in puts:
        spool.put(batch)
        ends.append((path / "journal").stat().st_size)
    spool.close()
    whole = (path / "journal").read_bytes()
    header = ends[0] - len(_frame(START | END, b"p0", b"zero", 0))
    for cut in range(header, len(whole) + 1):
        case = tmp_path / f"cut{cut}"
        case.mkdir(mode=0o700)
        (case / "journal").write_bytes(whole[:cut])
        expected = [
            i for batch, end in zip(puts, ends, strict=True) if end <= cut for i, _ in batch
        ]
        cut_spool = JournalSpool(case)
        assert _ids(cut_spool) == expected, cut
        assert cut_spool.depth() == len(expected)
        cut_spool.put([("after", b"the crash")])  # the next process appends after the debris
        with caplog.at_level(logging.ERROR, logger="sealtrail.spool"):
            assert _drain(cut_spool) == [*expected, "after"], cut
        cut_spool.close()


def test_damage_in_the_middle_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool"
    spool = JournalSpool(path)
    spool.put([("a", b"alpha")])
    spool.put([("b1", b"beta-one"), ("b2", b"beta-two")])
    spool.put([("c", b"gamma")])
    data = bytearray((path / "journal").read_bytes())
    at = data.index(b"beta-two")
    data[at] ^= 0x01  # one flipped bit in the middle group: the whole group goes
    (path / "journal").write_bytes(bytes(data))
    # and a megabyte of junk after it, with stray magic bytes in it
    with open(path / "journal", "ab") as f:
        f.write((b"\xa7J" + os.urandom(300)) * 3000)
    spool.put([("d", b"delta")])
    with caplog.at_level(logging.ERROR, logger="sealtrail.spool"):
        assert _drain(JournalSpool(path)) == ["a", "c", "d"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "damaged bytes" in messages or "unfinished put" in messages


def test_hostile_and_unusable_files_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="synchronous"):
        JournalSpool(tmp_path / "a", synchronous="OFF")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError, match="not a directory"):
        JournalSpool(tmp_path / "file")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "journal").write_bytes(b"GARBAGE!" + b"\0" * 100)
    with pytest.raises(StorageError, match="not a Sealtrail journal"):
        JournalSpool(bad)
    short = tmp_path / "short"
    short.mkdir()
    (short / "journal").write_bytes(b"SEAL")
    with pytest.raises(StorageError, match="not a Sealtrail journal"):
        JournalSpool(short)
    ok = JournalSpool(tmp_path / "ok", synchronous="full")
    with pytest.raises(StorageError, match="1-255 bytes"):
        ok.put([("x" * 300, b"body")])
    with pytest.raises(StorageError, match="1-255 bytes"):
        ok.put([("a", b"fine"), ("", b"body")])
    assert ok.depth() == 0  # nothing of a refused put was queued
    ok.put([("a", b"fine")])  # fsync'd, file and directory
    assert _ids(ok) == ["a"]


def test_a_damaged_ack_file_means_delivering_again_not_stalling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where delivery stood is lost: from the start is safe, because the ledger stores each
    event id once (tests/test_spool.py checks redelivery end to end)."""
    path = tmp_path / "spool"
    spool = JournalSpool(path)
    spool.put([("a", b"x")])
    spool.put([("b", b"y")])
    spool.ack(spool.peek(1)[0][0])
    assert _ids(spool) == ["b"]
    (path / "ack").write_bytes(b"\x01\x02")
    with caplog.at_level(logging.ERROR, logger="sealtrail.spool"):
        assert _ids(spool) == ["a", "b"]
    assert any("ack file is damaged" in r.getMessage() for r in caplog.records)
    stale = path / ".journal.123.abc"  # a header a dead process never linked
    stale.write_bytes(b"SEALJRN1")
    fresh = path / ".journal.456.def"  # one being written right now
    fresh.write_bytes(b"SEALJRN1")
    os.utime(stale, (1, 1))
    JournalSpool(path).close()
    assert not stale.exists() and fresh.exists()


def test_open_spool_picks_the_kind_by_path(tmp_path: Path) -> None:
    assert isinstance(open_spool(tmp_path / "s.db"), Spool)
    assert isinstance(open_spool(tmp_path / "dir"), JournalSpool)
    Spool(tmp_path / "legacy").close()  # an existing SQLite file, whatever its name
    assert isinstance(open_spool(tmp_path / "legacy"), Spool)


_WRITER = textwrap.dedent(
    """
    import sys
    from sealtrail.journal import JournalSpool
    spool = JournalSpool(sys.argv[1], rotate_bytes=2000)
    tag = sys.argv[2]
    for i in range(int(sys.argv[3])):
        spool.put([(f"{tag}-{i}", b"x" * (i % 97))])
    """
)


def test_writers_in_other_processes_and_a_rotating_deliverer_lose_nothing(
    tmp_path: Path,
) -> None:
    """Three processes append while this one delivers and retires files every 2 kB: every
    event arrives once, each writer's in its order."""
    path = tmp_path / "spool"
    deliverer = JournalSpool(path, rotate_bytes=2000)
    count = 400
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag, str(count)])
        for tag in ("a", "b", "c")
    ]
    got: list[str] = []
    while any(w.poll() is None for w in writers):
        rows = deliverer.peek(50)
        if rows:
            got += [i for _, i, _ in rows]
            deliverer.ack(rows[-1][0])
    assert all(w.returncode == 0 for w in writers)
    got += _drain(deliverer)
    assert len(got) == 3 * count == len(set(got))
    for tag in ("a", "b", "c"):
        assert [g for g in got if g.startswith(tag)] == [f"{tag}-{i}" for i in range(count)]


def test_a_put_in_flight_and_the_retiring_deliverer_exclude_each_other(tmp_path: Path) -> None:
    """The rotation's race, made deterministic: a writer holds a shared lock on the file for
    the length of its write, and the deliverer retires the file only under an exclusive one
    (after checking again that nothing was added)."""
    path = tmp_path / "spool"
    spool = JournalSpool(path, rotate_bytes=10)
    spool.put([("a", b"x" * 40)])
    rows = spool.peek(1)
    with open(path / "journal", "rb") as other:  # a writer in another process, mid-write
        fcntl.flock(other, fcntl.LOCK_SH)
        spool.ack(rows[-1][0])
        assert (path / "journal").exists()  # not retired under a writer
        fcntl.flock(other, fcntl.LOCK_UN)
    spool.put([("b", b"y")])
    assert _drain(spool) == ["b"]
    assert (path / "journal").stat().st_size < 64  # retired once it could be

    done = threading.Event()
    with open(path / "journal", "rb") as deliverer:  # a deliverer retiring the file
        fcntl.flock(deliverer, fcntl.LOCK_EX)
        writer = threading.Thread(target=lambda: (spool.put([("c", b"z")]), done.set()))
        writer.start()
        assert not done.wait(0.3)  # the put waits for the deliverer
        fcntl.flock(deliverer, fcntl.LOCK_UN)
        writer.join(5)
    assert done.is_set() and _ids(spool) == ["c"]


def test_a_child_forked_while_a_put_holds_the_lock_can_still_put(tmp_path: Path) -> None:
    """fork() copies a held lock but not the thread holding it (gunicorn --preload with a
    trail opened at import): the child's puts must not deadlock, and the parent's and the
    child's events share one journal."""
    spool = JournalSpool(tmp_path / "spool")
    spool.put([("before", b"x")])
    with spool._write_lock:  # another thread is in the middle of a put
        pid = os.fork()
        if pid == 0:  # the child
            try:
                signal.alarm(10)  # a deadlock kills it (and fails the test) instead of hanging
                spool.put([("child", b"y")])
            finally:
                os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    spool.put([("after", b"z")])
    assert _ids(spool) == ["before", "child", "after"]


_PUTS = st.lists(
    st.lists(
        st.tuples(
            st.uuids().map(str),
            # canonical JSON: no raw control characters, any other text
            st.text(alphabet=st.characters(min_codepoint=0x20, exclude_categories=["Cs"])).map(
                lambda t: orjson.dumps({"v": t})
            ),
        ),
        min_size=1,
        max_size=3,
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(
    before=_PUTS,
    after=_PUTS,
    junk=st.binary(max_size=200),
    cut=st.integers(min_value=0, max_value=400),
    flip=st.integers(min_value=0, max_value=2000),
)
def test_whatever_damage_lands_between_puts_the_reader_returns_only_whole_puts(
    tmp_path_factory: pytest.TempPathFactory,
    before: list[list[tuple[str, bytes]]],
    after: list[list[tuple[str, bytes]]],
    junk: bytes,
    cut: int,
    flip: int,
) -> None:
    """Hostile bytes in the file (a torn write, junk, a flipped bit): every put read back is
    one that was made, whole and in order; every put made after the damage is read back."""
    path = tmp_path_factory.mktemp("fuzz") / "spool"
    spool = JournalSpool(path)
    for batch in before:
        spool.put(batch)
    raw = bytearray((path / "journal").read_bytes())
    header = 32
    damaged = raw[header:]
    if damaged and flip < len(damaged) * 8:
        damaged[flip // 8] ^= 1 << (flip % 8)  # one flipped bit somewhere
    damaged = damaged[: max(0, len(damaged) - cut)] + junk  # a torn tail, then junk
    (path / "journal").write_bytes(bytes(raw[:header] + damaged))
    for batch in after:
        spool.put(batch)
    logging.getLogger("sealtrail.spool").disabled = True
    try:
        got = [(i, b) for _, i, b in JournalSpool(path).peek(10_000)]
    finally:
        logging.getLogger("sealtrail.spool").disabled = False
    made = [item for batch in before + after for item in batch]
    tail = [item for batch in after for item in batch]
    assert got[len(got) - len(tail) :] == tail  # nothing put after the damage is lost
    # and everything read is a subsequence of what was made, puts whole
    position = 0
    for item in got:
        position = made.index(item, position) + 1
    whole = {tuple(batch) for batch in before + after}
    groups, current = [], []
    for item in got:
        current.append(item)
        if tuple(current) in whole:
            groups.append(tuple(current))
            current = []
    assert not current, "a put came back in part"
