"""The ``sealtrail`` command line: a thin layer over :mod:`sealtrail.ledger`.

Exit codes: 0 success; 1 the data did not check out or was refused (tampering found, a
receipt or bundle that does not verify, an invalid event, an id conflict, nothing found);
2 the command could not run (usage, storage, missing files). Errors are one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import orjson

from sealtrail import __version__
from sealtrail._exceptions import (
    ConflictError,
    FormatError,
    IntegrityError,
    InvalidEvent,
    NotFound,
    SealtrailError,
)
from sealtrail.event import BadLine, parse_event, parse_jsonl, prepare_event
from sealtrail.home import Home, init_ledger, open_ledger, resolve_home
from sealtrail.ledger import Ledger
from sealtrail.note import Verifier
from sealtrail.render import csv_cell, escape_text, json_text
from sealtrail.store.base import SearchQuery
from sealtrail.verify import open_trusted

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
#: The store URL when ``--store`` is not given (a URL's password stays out of ``ps``).
ENV_STORE = "SEALTRAIL_STORE"
#: The application database ``sealtrail relay`` reads when ``--from`` is not given.
ENV_APP_DB = "SEALTRAIL_APP_DB"
RECORD_CHUNK = 5000


class UsageError(SealtrailError):
    pass


# -- helpers -------------------------------------------------------------------------------
def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(f"sealtrail: {text}\n")


@contextlib.contextmanager
def _progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on an interactive terminal; nothing when piped or with --json."""
    if not sys.stderr.isatty() or total == 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        console=Console(stderr=True),
        # Rich would otherwise route our stdout (receipts, results) through the bar's console.
        redirect_stdout=False,
        redirect_stderr=False,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _read_arg_file(value: str, what: str) -> bytes:
    if value == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {value}: {exc.strerror}") from None


def _vkey(value: str) -> Verifier:
    """A vkey given inline or as a file holding it."""
    text = value
    if "+" not in value or os.path.exists(value):
        text = _read_arg_file(value, "vkey file").decode("utf-8", "replace").strip()
    return Verifier.from_vkey(text)


def _time_arg(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        event = prepare_event({"action": "x.y", "time": value})
    except InvalidEvent as exc:
        raise UsageError(f"--{name}: {exc.reason}") from None
    return str(event["time"])


def _ledger(args: argparse.Namespace, read_only: bool = False) -> Ledger:
    return open_ledger(args.home, args.store, read_only=read_only)


@contextlib.contextmanager
def _indexed_ledger(args: argparse.Namespace) -> Iterator[Ledger]:
    """The ledger, read-only, its search index brought up to date first (with a progress
    bar on a terminal)."""
    ledger = _ledger(args, read_only=True)
    try:
        pending = ledger.pending_index()
        with _progress("indexing", pending) as advance:
            ledger.catch_up_index(advance)
        yield ledger
    finally:
        ledger.close()


# -- commands ------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    ledger = init_ledger(args.home, args.store, args.origin)
    try:
        _out(ledger.verifier.vkey())
        _err(f"created log {ledger.origin!r} in {resolve_home(args.home)}; verifier key above")
    finally:
        ledger.close()
    return EXIT_OK


def _print_results(results: Sequence[Any], as_json: bool) -> None:
    for r in results:
        _out(json_text(r.to_json()))


def _report_bad_lines(bad: list[BadLine]) -> int:
    for b in bad[:100]:
        _err(f"line {b.line}: {b.reason}")
    if len(bad) > 100:
        _err(f"... and {len(bad) - 100} more bad lines")
    _err(f"{len(bad)} invalid line(s): nothing was recorded")
    return EXIT_FAIL


def cmd_record(args: argparse.Namespace) -> int:
    if args.event is not None and args.file is not None:
        raise UsageError("give one event as an argument, or --file, not both")
    if args.event is None and args.file is None:
        raise UsageError("give an event as JSON, or --file F.jsonl (- for stdin)")
    if args.event is not None:
        source = sys.stdin.buffer.read() if args.event == "-" else args.event.encode("utf-8")
        event = parse_event(source)
        ledger = _ledger(args)
        try:
            _print_results(ledger.append_prepared([event]), args.json)
        finally:
            ledger.close()
        return EXIT_OK
    return _record_file(args)


def _record_file(args: argparse.Namespace) -> int:
    # Pass 1 validates everything without keeping it, so an invalid line stores nothing
    # and memory stays flat; stdin is spooled to a temporary file for the second pass.
    with contextlib.ExitStack() as stack:
        if args.file == "-":
            spool = stack.enter_context(tempfile.TemporaryFile())
            while block := sys.stdin.buffer.read(1 << 20):
                spool.write(block)
            spool.seek(0)
            handle: IO[bytes] = spool
        else:
            try:
                handle = stack.enter_context(open(args.file, "rb"))
            except OSError as exc:
                raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
        bad: list[BadLine] = []
        total = 0
        for start, lines in _line_chunks(handle):
            events, problems = parse_jsonl(lines)
            total += len(events)
            bad.extend(BadLine(p.line + start, p.reason) for p in problems)
        if bad:
            return _report_bad_lines(bad)
        handle.seek(0)
        ledger = _ledger(args)
        stack.callback(ledger.close)
        with _progress("recording", total) as advance:
            for _start, lines in _line_chunks(handle):
                events, _ = parse_jsonl(lines)
                results = ledger.append_prepared(events)
                _print_results(results, args.json)
                advance(len(results))
    return EXIT_OK


def _line_chunks(handle: IO[bytes]) -> Iterator[tuple[int, list[bytes]]]:
    """Lines in chunks, with the line number before each chunk."""
    start = 0
    chunk: list[bytes] = []
    for line in handle:
        chunk.append(line)
        if len(chunk) >= RECORD_CHUNK:
            yield start, chunk
            start += len(chunk)
            chunk = []
    if chunk:
        yield start, chunk


QUERY_COLUMNS = ("index", "time", "action", "outcome", "actor", "target", "id")


def _row(seq: int, event: dict[str, Any]) -> dict[str, Any]:
    actor: dict[str, Any] = event["actor"] if isinstance(event.get("actor"), dict) else {}
    target: dict[str, Any] = event["target"] if isinstance(event.get("target"), dict) else {}
    target_text = ":".join(str(target[k]) for k in ("type", "id") if k in target)
    return {
        "index": seq,
        "time": event.get("time"),
        "action": event.get("action"),
        "outcome": event.get("outcome"),
        "actor": actor.get("id"),
        "target": target_text or None,
        "id": event.get("id"),
    }


def cmd_query(args: argparse.Namespace) -> int:
    query = SearchQuery(
        actor=args.actor,
        action=args.action,
        target=args.target,
        outcome=args.outcome,
        tenant=args.tenant,
        subject=args.subject,
        since=_time_arg(args.since, "since"),
        until=_time_arg(args.until, "until"),
        after=args.after,
        limit=args.limit,
        descending=args.reverse,
    )
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    with _indexed_ledger(args) as ledger:
        entries = list(ledger.iter_query(query))
    events = [
        (
            e.seq,
            orjson.loads(e.body)
            if e.body is not None
            else {"id": e.id, "ledger": {"seq": e.seq}, "pruned": True},
        )
        for e in entries
    ]
    fmt = args.format
    if fmt == "json":
        _out(json_text([ev for _, ev in events], indent=True))
    elif fmt == "jsonl":
        for _, ev in events:
            _out(json_text(ev))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(QUERY_COLUMNS)
        for seq, ev in events:
            row = _row(seq, ev)
            writer.writerow(
                [csv_cell(None if row[c] is None else escape_text(row[c])) for c in QUERY_COLUMNS]
            )
        sys.stdout.write(buf.getvalue())
    else:
        _print_table(QUERY_COLUMNS, [list(_row(s, ev).values()) for s, ev in events])
        if not events:
            _err("no matching events")
    return EXIT_OK


def _print_table(columns: Sequence[str], values: Sequence[Sequence[object]]) -> None:
    """Aligned columns under upper-case headings, each cell one escaped line."""
    rows = [[escape_text("" if v is None else v) for v in row] for row in values]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    _out("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in rows:
        _out("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def cmd_show(args: argparse.Namespace) -> int:
    ledger = _ledger(args, read_only=True)
    try:
        entry = ledger.get(args.id)
    finally:
        ledger.close()
    if entry.body is None:
        if args.canonical:
            raise NotFound(f"event {args.id} was pruned: only its leaf hash remains")
        _out(
            orjson.dumps(
                {
                    "id": entry.id,
                    "index": entry.seq,
                    "pruned": True,
                    "leaf_hash": entry.leaf_hash.hex(),
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
        return EXIT_OK
    if args.canonical:
        sys.stdout.buffer.write(entry.body)
        sys.stdout.buffer.flush()
    else:
        _out(json_text(orjson.loads(entry.body), indent=True))
    return EXIT_OK


def cmd_checkpoint(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    try:
        sys.stdout.write(ledger.checkpoint().note)
    finally:
        ledger.close()
    return EXIT_OK


def cmd_vkey(args: argparse.Namespace) -> int:
    _out(Home(resolve_home(args.home)).signer().vkey())
    return EXIT_OK


def cmd_prove(args: argparse.Namespace) -> int:
    ledger = _ledger(args, read_only=True)
    try:
        receipt = ledger.prove(args.id)
    finally:
        ledger.close()
    sys.stdout.write(receipt.to_text())
    return EXIT_OK


def cmd_verify_receipt(args: argparse.Namespace) -> int:
    from sealtrail.receipt import verify_receipt

    receipt = _read_arg_file(args.receipt, "receipt")
    entry = _read_arg_file(args.entry, "entry")
    verifier = _vkey(args.vkey)
    try:
        checkpoint = verify_receipt(receipt, entry, verifier)
    except FormatError as exc:
        raise IntegrityError(f"the receipt does not verify: {exc}") from None
    _out(
        f"OK: the entry is in the log {escape_text(checkpoint.origin)} "
        f"(tree size {checkpoint.size})"
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    ledger = open_ledger(
        args.home, args.store, vkey=None if args.vkey is None else _vkey(args.vkey).vkey()
    )
    try:
        trusted = None
        if args.trusted is not None:
            trusted = _read_arg_file(args.trusted, "trusted checkpoint").decode("utf-8", "replace")
            try:
                open_trusted(trusted, ledger.verifier)
            except (FormatError, IntegrityError) as exc:
                # Nothing to compare with: that is "could not run", not "tampering found".
                raise UsageError(
                    f"the trusted checkpoint {args.trusted} is not a checkpoint of this log: {exc}"
                ) from None
        total = ledger.size()
        with _progress("verifying", None if args.json else total) as advance:
            report = ledger.verify(trusted, progress=advance)
    finally:
        ledger.close()
    if args.json:
        _out(json_text(report.to_json(), indent=True))
    else:
        for finding in report.findings:
            _out(f"TAMPERED {escape_text(str(finding))}")
        for kind, n in report.suppressed.items():
            _out(f"TAMPERED {kind}: {n} more not shown")
        summary = (
            f"{report.entries} entries ({report.pruned} pruned), "
            f"{report.checkpoints} signed checkpoints"
        )
        if report.latest is not None:
            summary += f", latest covers {report.latest.size}"
        if report.trusted is not None and report.ok:
            summary += f"; extends the trusted checkpoint of size {report.trusted.size}"
        if report.unsigned_tail:
            summary += f"; {report.unsigned_tail} newest entries not yet signed"
        _out(("intact: " if report.ok else "TAMPERING FOUND: ") + summary)
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_export(args: argparse.Namespace) -> int:
    ledger = _ledger(args, read_only=True)
    try:
        begin, end = args.begin or 0, args.end
        if args.since is not None or args.until is not None:
            ledger.catch_up_index()
            low, high = ledger.store.seq_range_for_time(
                _time_arg(args.since, "since"), _time_arg(args.until, "until")
            )
            begin, end = max(begin, low), high if end is None else min(end, high)
        try:
            out = open(args.file, "wb")  # noqa: SIM115 (closed by the with below)
        except OSError as exc:
            raise UsageError(f"cannot write {args.file}: {exc.strerror}") from None
        with (
            out,
            _progress("exporting", (end if end is not None else ledger.size()) - begin) as adv,
        ):
            begin, end, cp = ledger.export(out, begin, end, progress=adv)
    finally:
        ledger.close()
    _err(f"exported entries {begin}..{end - 1} ({end - begin}) under checkpoint {cp.size}")
    return EXIT_OK


def cmd_verify_bundle(args: argparse.Namespace) -> int:
    from sealtrail.bundle import verify_bundle

    verifier = _vkey(args.vkey)
    try:
        handle = open(args.file, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    with handle:
        try:
            report = verify_bundle(handle, verifier)
        except FormatError as exc:
            raise IntegrityError(f"the bundle does not verify: {exc}") from None
    if args.json:
        _out(json_text(report.to_json(), indent=True))
    else:
        for p in report.problems:
            _out(f"BAD {escape_text(p)}")
        state = "OK" if report.ok else "FAILED"
        _out(
            f"{state}: {report.entries} of {report.end - report.begin} entries "
            f"({report.begin}..{report.end - 1}) proven in "
            f"{escape_text(report.checkpoint.origin if report.checkpoint else '?')}"
        )
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_prune(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    try:
        result = ledger.prune(args.index, args.reason)
    finally:
        ledger.close()
    _out(json_text(result.to_json()))
    return EXIT_OK


def cmd_index(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    try:
        with _progress("indexing", ledger.pending_index()) as advance:
            n = ledger.catch_up_index(advance)
    finally:
        ledger.close()
    _err(f"indexed {n} entries")
    return EXIT_OK


def cmd_relay(args: argparse.Namespace) -> int:
    """Ship an application database's outbox to the ledger (see sealtrail.capture.relay)."""
    import signal

    from sealtrail.capture.relay import Relay

    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    if not args.poll > 0:
        raise UsageError("--poll must be a positive number of seconds")
    if args.workers is not None and args.workers < 0:
        raise UsageError("--workers must be 0 or more")
    if not args.metrics_every > 0:
        raise UsageError("--metrics-every must be a positive number of seconds")
    if not args.alert_age >= 0:
        raise UsageError("--alert-age must be 0 (off) or more")
    source = _app_db(args.source, "--from")
    processors = None
    if args.policy is not None:
        from sealtrail.redact import Policy, Redactor

        try:
            processors = [Redactor(Policy.from_toml(Path(args.policy)))]
        except ValueError as exc:
            raise UsageError(f"--policy {args.policy}: {exc}") from None
    ledger = _ledger(args)
    try:
        relay = Relay(
            source,
            ledger,
            processors=processors,
            batch=args.batch,
            poll=args.poll,
            schema=args.schema,
            workers=_relay_workers() if args.workers is None else args.workers,
            alert_age=args.alert_age,
        )
        write_metrics = _metrics_writer(args.metrics_file, relay.metrics, "relay")
        try:
            if args.once:
                stats = relay.run_once()
                write_metrics()
                if args.json:
                    _out(json_text(stats.to_json()))
                _err(
                    f"relay: {stats.shipped} new, {stats.duplicates} already stored, "
                    f"{stats.rejected} rejected (recorded as sealtrail.relay.rejected), "
                    f"in {stats.batches} batches"
                )
                return EXIT_OK
            stop = threading.Event()
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                with _daemon_logging("sealtrail.relay", "relay"):
                    _err(
                        f"relay: shipping {escape_text(relay.source)} to the ledger (SIGTERM stops)"
                    )
                    relay.start()
                    write_metrics()
                    _watch(args, stop, write_metrics, lambda: None)
                    relay.stop(timeout=None)
                write_metrics()
            finally:
                signal.signal(signal.SIGTERM, previous)
            _err(
                f"relay: stopped; {relay.stats.shipped} new, {relay.stats.duplicates} already "
                f"stored, {relay.stats.rejected} rejected"
            )
            return EXIT_OK
        finally:
            relay.close()
    finally:
        ledger.close()


def cmd_deliver(args: argparse.Namespace) -> int:
    """Deliver a best-effort spool to the ledger from this process (see sealtrail.spool):
    applications that ``connect(..., mode="best-effort", deliver=False)`` only queue."""
    import signal

    from sealtrail.spool import Backoff, SpooledSink, open_spool
    from sealtrail.trail import default_spool

    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    if not args.timeout > 0:
        raise UsageError("--timeout must be a positive number of seconds")
    if not args.poll > 0:
        raise UsageError("--poll must be a positive number of seconds")
    if args.alert_backlog < 0 or not args.alert_age >= 0:
        raise UsageError("--alert-backlog and --alert-age must be 0 (off) or more")
    if not args.metrics_every > 0:
        raise UsageError("--metrics-every must be a positive number of seconds")
    if args.parent is not None and args.parent < 1:
        raise UsageError("--parent must be a process id")
    path = Path(args.spool) if args.spool is not None else default_spool(args.home)
    if args.once and not path.exists():
        raise UsageError(f"no spool at {path}")  # the daemon creates it: it may start first
    sink = SpooledSink(
        open_spool(path),
        lambda: _ledger(args),
        batch=args.batch,
        backoff=Backoff(cap=5.0) if args.once else None,
        # The applications' puts cannot wake a deliverer in another process: it looks.
        idle_poll=args.poll,
        alert_backlog=args.alert_backlog,
        alert_age=args.alert_age,
    )
    write_metrics = _metrics_writer(args.metrics_file, sink.metrics, "deliver")

    try:
        if args.once:
            with _daemon_logging("sealtrail.spool", "deliver"):
                done = sink.flush(args.timeout)
            write_metrics()
            stats = sink.stats()
            if args.json:
                _out(json_text(stats.to_json()))
            _err(
                f"deliver: {stats.delivered_total} delivered ({stats.duplicates_total} already "
                f"stored), {stats.rejected_total} set aside, {stats.backlog} waiting"
                + ("" if done else f"; gave up after {args.timeout:g} s: {stats.last_error}")
            )
            return EXIT_OK if done else EXIT_ERROR
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            with _daemon_logging("sealtrail.spool", "deliver"):
                if not args.quiet:
                    _err(
                        f"deliver: delivering {escape_text(str(path))} to the ledger "
                        "(SIGTERM stops)"
                    )
                write_metrics()
                _watch(args, stop, write_metrics, lambda: sink.flush(args.timeout))
            write_metrics()
        finally:
            signal.signal(signal.SIGTERM, previous)
        stats = sink.stats()
        if not args.quiet:
            _err(
                f"deliver: stopped; {stats.delivered_total} delivered, "
                f"{stats.rejected_total} set aside, {stats.backlog} waiting"
            )
        return EXIT_OK
    finally:
        # The batch in flight finishes; what is left waits in the spool for the next one,
        # rather than holding up a stop (the target may be what is down).
        sink.pause()
        sink.close()


def _metrics_writer(file: str | None, produce: Callable[[], str], who: str) -> Callable[[], None]:
    """What writes ``produce()`` to ``file`` (nothing without one): whole or not at all,
    for a collector that reads it at any moment (node_exporter's textfile collector); a
    failure to write it is reported, not fatal."""

    def write() -> None:
        if file is None:
            return
        path = Path(file)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(produce(), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            _err(f"{who}: cannot write {escape_text(str(path))}: {exc.strerror or exc}")

    return write


def _watch(
    args: argparse.Namespace,
    stop: threading.Event,
    write_metrics: Callable[[], None],
    drain: Callable[[], object],
) -> None:
    """Until SIGTERM: the metrics file every ``--metrics-every`` s and, with ``--parent``,
    a look every half second at whether that process is still there (when it is gone,
    deliver what it left, then stop)."""
    parent = getattr(args, "parent", None)
    every = args.metrics_every if args.metrics_file is not None else None
    tick = every if parent is None else min(every or 0.5, 0.5)
    due = time.monotonic() + (every or 0.0)
    while not stop.wait(tick):
        if every is not None and time.monotonic() >= due:
            write_metrics()
            due = time.monotonic() + every
        if parent is not None and os.getppid() != parent:
            drain()
            return


def cmd_capture(args: argparse.Namespace) -> int:
    """Install, check or remove database capture on PostgreSQL (see sealtrail.capture.pg).
    ``check`` exits 1 when a tracked table's capture is missing, disabled or stale."""
    from sealtrail.capture import pg

    db = _app_db(args.db, "--db")
    if not db.startswith(("postgresql://", "postgres://")):
        raise UsageError(
            "--db must be a postgresql:// URL; elsewhere capture runs through SQLAlchemy "
            "(sealtrail.capture.orm)"
        )
    tracks = None if args.config is None else _tracks_arg(args.config)
    if tracks is None and args.action != "uninstall":
        raise UsageError(f"capture {args.action} needs --config (the tracked tables)")
    if args.action == "install":
        assert tracks is not None
        done = pg.install(db, tracks, schema=args.schema)
        for table in done:
            _out(f"installed {escape_text(table)}")
        _err(f"capture: {len(done)} of {len(tracks)} tables (re)installed, the rest current")
        return EXIT_OK
    if args.action == "check":
        assert tracks is not None
        problems = pg.check(db, tracks, schema=args.schema)
        if args.json:
            _out(
                json_text(
                    [{"table": p.table, "kind": p.kind, "detail": p.detail} for p in problems]
                )
            )
        else:
            for problem in problems:
                _out(escape_text(str(problem)))
        if problems:
            _err(f"capture: {len(problems)} problem(s); run 'sealtrail capture install'")
            return EXIT_FAIL
        _err(f"capture: all {len(tracks)} tracked tables are captured and current")
        return EXIT_OK
    done = pg.uninstall(db, tracks, schema=args.schema)
    for table in done:
        _out(f"uninstalled {escape_text(table)}")
    return EXIT_OK


def _app_db(value: str | None, flag: str) -> str:
    """The application database's URL: the flag's value, else ``$SEALTRAIL_APP_DB`` (which
    keeps a password out of ``ps``)."""
    url = value or os.environ.get(ENV_APP_DB)
    if not url:
        raise UsageError(f"{flag} URL (or ${ENV_APP_DB}) names the application database")
    return url


def _tracks_arg(path: str) -> list[Any]:
    """The tracked tables of a ``[[track]]`` TOML file, or a one-line usage error."""
    from sealtrail.capture.change import tracks_from_toml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: cannot read it: {exc}") from None
    try:
        return tracks_from_toml(text)
    except ValueError as exc:
        raise UsageError(f"--config {path}: {exc}") from None


def _row_key_arg(value: str) -> dict[str, Any] | str:
    """KEY on the command line: a one-column key's value as text (``42``, a UUID), or a
    JSON object of column to value (a composite key, or a text key that starts with
    ``{``)."""
    if not value:
        raise UsageError("KEY must not be empty")
    if not value.startswith("{"):
        return value
    try:
        key = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"KEY {escape_text(value[:80])}: not a JSON object: {exc}") from None
    if not isinstance(key, dict) or not key:
        raise UsageError("KEY: a composite key is a JSON object of column to value")
    return key


def _where_arg(items: Sequence[str]) -> dict[str, Any]:
    """``--where COLUMN=VALUE`` (repeated): the value as JSON when it parses (``42``,
    ``true``, ``null``, ``"42"``), else as text."""
    where: dict[str, Any] = {}
    for item in items:
        column, sep, text = item.partition("=")
        if not sep or not column:
            raise UsageError(f"--where {escape_text(item[:80])}: expected COLUMN=VALUE")
        try:
            value: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = text
        if column in where and where[column] != value:
            raise UsageError(f"--where names {escape_text(column)} twice with other values")
        where[column] = value
    return where


HISTORY_COLUMNS = ("index", "time", "op", "actor", "txid", "changes")


def _value_text(value: object) -> str:
    """A recorded value as JSON (escaped for the terminal with the rest of its cell)."""
    if value == {"masked": True}:
        return "(masked)"
    return orjson.dumps(value).decode()


def _changes_text(op: str, changes: dict[str, Any]) -> str:
    """One line: ``col: old -> new`` for an update, ``col=value`` for an insert or a
    delete (its new or old values), columns in name order."""
    parts = []
    for column in sorted(changes):
        value = changes[column]
        if isinstance(value, dict) and ("old" in value or "new" in value):
            if op == "update":
                parts.append(
                    f"{column}: {_value_text(value.get('old'))} -> {_value_text(value.get('new'))}"
                )
            else:
                side = value.get("new") if op == "insert" else value.get("old")
                parts.append(f"{column}={_value_text(side)}")
        else:
            parts.append(f"{column}={_value_text(value)}")
    return "; ".join(parts)


def cmd_history(args: argparse.Namespace) -> int:
    """A captured row's changes, its state at a time, or a table's rows at a time (see
    sealtrail.capture.history)."""
    from sealtrail.capture.history import (
        IncompleteHistory,
        history,
        pruned_changes,
        state_at,
        table_at,
    )

    table = args.table
    if not table or table != table.strip():
        raise UsageError("TABLE must be a table's name as captured (schema.table on PostgreSQL)")
    when = _time_arg(args.at, "at")
    key = None if args.key is None else _row_key_arg(args.key)
    if key is None and when is None:
        raise UsageError("history TABLE needs KEY (one row), or --at TIME (the whole table)")
    where_columns = _where_arg(args.where or [])
    if where_columns and (key is not None or when is None):
        raise UsageError("--where selects rows of the whole table: give --at TIME and no KEY")
    where = escape_text(table) + ("" if key is None else " " + escape_text(json_text(key)))
    with _indexed_ledger(args) as ledger:
        try:
            if key is None:
                assert when is not None
                rows = table_at(ledger, table, when, where=where_columns or None)
                _out(json_text(rows, indent=True))
                if not rows:
                    _err(f"no rows of {where} at {when} in the trail")
                return EXIT_OK
            if when is not None:
                state = state_at(ledger, table, key, when)
                if state is None:
                    _err(f"{where} did not exist at {when}, as far as the trail shows")
                    return EXIT_FAIL
                _out(json_text(state, indent=True))
                return EXIT_OK
        except IncompleteHistory as exc:
            _err(escape_text(str(exc)))
            return EXIT_FAIL
        changes = history(ledger, table, key)
        pruned = pruned_changes(ledger, table)
    if args.json:
        _out(json_text([c.to_json() for c in changes], indent=True))
    else:
        _print_table(
            HISTORY_COLUMNS,
            [
                [
                    c.seq,
                    c.time,
                    c.op + ("" if c.reverts is None else f" (reverts {c.reverts})"),
                    None if c.actor is None else c.actor.get("id"),
                    c.txid,
                    _changes_text(c.op, c.changes),
                ]
                for c in changes
            ],
        )
    if pruned:
        more = "+" if len(pruned) >= 20 else ""
        _err(
            f"note: {len(pruned)}{more} change events of {escape_text(table)} were pruned "
            f"(the first at index {pruned[0]}); those of this row are not listed"
        )
    if not changes:
        _err(
            f"no captured changes of {where} (tables are named as captured: schema.table on "
            "PostgreSQL)"
        )
        return EXIT_FAIL
    return EXIT_OK


def cmd_revert(args: argparse.Namespace) -> int:
    """Undo a captured change (event id) or transaction (transaction id) in the
    application database, as a new captured change (see sealtrail.capture.revert)."""
    import sealtrail
    from sealtrail.capture.relay import open_app_db
    from sealtrail.capture.revert import NotCaptured, RevertError, RevertResult, revert

    db = _app_db(args.db, "--db")
    if not args.dry_run and not args.actor:
        raise UsageError("--actor names who reverts (it is recorded with the revert's changes)")
    since = _time_arg(args.since, "since")
    tracks = None if args.config is None else _tracks_arg(args.config)
    with _indexed_ledger(args) as ledger:
        engine = open_app_db(db)
        capture = None
        try:
            if tracks is not None:
                if engine.dialect.name == "postgresql":
                    raise UsageError(
                        "--config is for databases captured through SQLAlchemy; on PostgreSQL "
                        "the triggers capture the revert"
                    )
                from sealtrail.capture import orm

                capture = orm.track(engine, tracks)
            with sealtrail.context(actor=args.actor or None):
                try:
                    result = revert(
                        engine,
                        ledger,
                        args.ref,
                        dry_run=args.dry_run,
                        since=since,
                        reason=args.reason,
                    )
                except NotCaptured as exc:
                    hint = "" if tracks else "; give --config with the tracked tables"
                    _err(escape_text(f"{exc}{hint}"))
                    return EXIT_FAIL
                except RevertError as exc:
                    if not exc.conflicts:
                        _err(escape_text(str(exc)))
                        return EXIT_FAIL
                    result = RevertResult(ref=args.ref, dry_run=False)
                    result.conflicts.extend(exc.conflicts)
        finally:
            if capture is not None:
                capture.remove()
            engine.dispose()
    if args.json:
        _out(json_text(result.to_json()))
    for conflict in result.conflicts:
        _out(escape_text(f"conflict: {conflict.message}"))
    what = f"{len(result.undone)} change(s)"
    if result.conflicts:
        _err(f"revert: {len(result.conflicts)} conflict(s); nothing was changed")
        return EXIT_FAIL
    if args.dry_run:
        _err(f"revert: dry run: {what} would be undone without conflict; nothing was changed")
    else:
        _err(f"revert: {what} undone, recorded as reverting {escape_text(args.ref)}")
    return EXIT_OK


def _relay_workers(cpus: int | None = None) -> int:
    """Processes preparing events beside the relay: none on one CPU, two on two or three
    (on a 2-CPU machine two workers beat none in 9 of 10 runs, by up to 46%, and one was
    no better than none: docs/db-capture.md), then one per CPU beyond the first, up to
    four."""
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    return 0 if cpus < 2 else min(4, max(2, cpus - 1))


class _DaemonLogHandler(logging.Handler):
    """A daemon's warnings (retries, rejected events, alerts) as one-line messages on
    stderr, after the command's name."""

    def __init__(self, prefix: str, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        _err(f"{self.prefix}: " + escape_text(record.getMessage()))


@contextlib.contextmanager
def _daemon_logging(logger: str, prefix: str) -> Iterator[None]:
    handler = _DaemonLogHandler(prefix)
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


# -- parser --------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        _err(message)
        raise SystemExit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--home",
        default=argparse.SUPPRESS,
        help="home directory (default $SEALTRAIL_HOME or ./.sealtrail)",
    )
    common.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        help="store URL: sqlite:///file.db or postgresql://... (default $SEALTRAIL_STORE, "
        "else the home's; the variable keeps a password off the command line)",
    )

    parser = _Parser(
        prog="sealtrail", description="Tamper-evident security audit trails.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"sealtrail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init, "create the store and the log's signing key; print the vkey")
    p.add_argument("--origin", help="the log's name in checkpoints (default: host-based)")

    p = add(
        "record", cmd_record, "append one event, or JSON Lines from a file or stdin; print receipts"
    )
    p.add_argument("event", nargs="?", help="the event as JSON (- reads one event from stdin)")
    p.add_argument("--file", "-f", help="JSON Lines file, - for stdin")
    p.add_argument("--json", action="store_true", help="(receipts are always JSON Lines)")

    p = add("query", cmd_query, "search the trail")
    p.add_argument("--actor")
    p.add_argument("--action", help="exact, or a prefix such as user.*")
    p.add_argument("--target", help="target id, or type:id")
    p.add_argument("--outcome", choices=["success", "failure", "denied", "error"])
    p.add_argument("--tenant")
    p.add_argument("--subject")
    p.add_argument("--since", help="RFC 3339 time, inclusive")
    p.add_argument("--until", help="RFC 3339 time, exclusive")
    p.add_argument("--after", type=int, help="continue after this index (keyset pagination)")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--reverse", action="store_true", help="newest first")
    p.add_argument("--format", choices=["table", "json", "jsonl", "csv"], default="table")

    p = add("show", cmd_show, "one event")
    p.add_argument("id")
    p.add_argument("--canonical", action="store_true", help="write its exact leaf bytes to stdout")

    add(
        "checkpoint",
        cmd_checkpoint,
        "print the latest signed checkpoint (sign one first if the tree grew)",
    )
    add("vkey", cmd_vkey, "print the verifier key")

    p = add("prove", cmd_prove, "print the event's c2sp.org/tlog-proof@v1 receipt")
    p.add_argument("id")

    p = add(
        "verify-receipt",
        cmd_verify_receipt,
        "check a receipt offline with the entry bytes and the vkey",
    )
    p.add_argument("receipt", help="receipt file (- for stdin)")
    p.add_argument(
        "--entry", required=True, help="file with the entry's exact bytes (show --canonical)"
    )
    p.add_argument("--vkey", required=True, help="verifier key, or a file holding it")

    p = add(
        "verify",
        cmd_verify,
        "re-check everything: exit 0 intact, 1 tampering found, 2 could not run",
    )
    p.add_argument("--trusted", help="a checkpoint saved earlier, that the log must extend")
    p.add_argument("--vkey", help="verify against this verifier key instead of the home's")
    p.add_argument("--json", action="store_true")

    p = add("export", cmd_export, "write a range of the trail as a bundle verifiable offline")
    p.add_argument("file")
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--begin", type=int, help="first index")
    p.add_argument("--end", type=int, help="index after the last")

    p = add("verify-bundle", cmd_verify_bundle, "check an export bundle offline")
    p.add_argument("file")
    p.add_argument("--vkey", required=True)
    p.add_argument("--json", action="store_true")

    p = add(
        "prune",
        cmd_prune,
        "remove the bodies of entries, keeping their proofs (recorded as an event)",
    )
    p.add_argument("index", type=int, nargs="+")
    p.add_argument("--reason", required=True)

    add("index", cmd_index, "bring the search index up to date")

    p = add(
        "relay",
        cmd_relay,
        "ship an application database's captured changes (its outbox) to the ledger",
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="URL",
        help=f"the application database: postgresql://... or sqlite:///app.db (default "
        f"${ENV_APP_DB}, which keeps a password off the command line)",
    )
    p.add_argument("--once", action="store_true", help="ship what is there now, then exit")
    p.add_argument("--batch", type=int, default=2000, help="events per ledger transaction")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between polls when idle")
    p.add_argument("--schema", help="schema of the outbox tables (default: search path)")
    p.add_argument("--policy", help="redaction policy TOML (default: the built-in policy)")
    p.add_argument(
        "--workers",
        type=int,
        help="processes that redact and validate events (default: none on 1 CPU, 2 on 2 "
        "or 3, else one per CPU beyond the first, up to 4)",
    )
    p.add_argument("--json", action="store_true", help="with --once: print the counts as JSON")
    p.add_argument(
        "--alert-age",
        type=float,
        default=300.0,
        help="log a warning when the oldest captured change has waited this many seconds "
        "(0: never)",
    )
    p.add_argument(
        "--metrics-file",
        help="keep the relay's Prometheus metrics in this file (textfile collector format): "
        "rows waiting, the oldest one's age, what was shipped, refused and retried",
    )
    p.add_argument(
        "--metrics-every", type=float, default=15.0, help="seconds between metrics writes"
    )

    p = add(
        "deliver",
        cmd_deliver,
        "deliver a best-effort spool to the ledger (for applications that only queue)",
    )
    p.add_argument("--spool", help="the spool (default: <home>/spool, or <home>/spool.db)")
    p.add_argument("--once", action="store_true", help="deliver what is there now, then exit")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="with --once: give up after this long"
    )
    p.add_argument("--batch", type=int, default=500, help="events per ledger transaction")
    p.add_argument(
        "--poll", type=float, default=0.05, help="seconds between looks at an empty spool"
    )
    p.add_argument(
        "--alert-backlog",
        type=int,
        default=10_000,
        help="log a warning when this many events wait (0: never)",
    )
    p.add_argument(
        "--alert-age",
        type=float,
        default=300.0,
        help="log a warning when the oldest waiting event is this many seconds old (0: never)",
    )
    p.add_argument(
        "--metrics-file",
        help="keep the spool's Prometheus metrics in this file (textfile collector format)",
    )
    p.add_argument(
        "--metrics-every", type=float, default=15.0, help="seconds between metrics writes"
    )
    p.add_argument(
        "--parent",
        type=int,
        help="the application's process id: when it is gone, deliver what is left and stop",
    )
    p.add_argument("--quiet", action="store_true", help="no start and stop lines")
    p.add_argument("--json", action="store_true", help="with --once: print the counts as JSON")

    p = add(
        "capture",
        cmd_capture,
        "install, check or remove database capture (PostgreSQL triggers) on tracked tables",
    )
    p.add_argument("action", choices=["install", "check", "uninstall"])
    p.add_argument("--db", metavar="URL", help=f"the application database (default ${ENV_APP_DB})")
    p.add_argument("--config", help="TOML file listing the tracked tables ([[track]] entries)")
    p.add_argument("--schema", default="public", help="schema of the outbox (default public)")
    p.add_argument("--json", action="store_true", help="check: print the problems as JSON")

    p = add(
        "history",
        cmd_history,
        "a captured row's changes, its state at a time, or a table's rows at a time",
    )
    p.add_argument("table", help="the table, as captured (schema.table on PostgreSQL)")
    p.add_argument(
        "key",
        nargs="?",
        help="the row's key: a one-column key's value, or a JSON object of column to value",
    )
    p.add_argument(
        "--at", metavar="TIME", help="RFC 3339 time: the row (or, without KEY, every row) then"
    )
    p.add_argument(
        "--where",
        action="append",
        metavar="COLUMN=VALUE",
        help="with --at and no KEY: only rows whose column holds this value (JSON, else text)",
    )
    p.add_argument("--json", action="store_true", help="the changes as JSON")

    p = add(
        "revert",
        cmd_revert,
        "undo a captured change (event id) or transaction (transaction id), as a new "
        "recorded change",
    )
    p.add_argument("ref", help="an event id, or a transaction id (data.db.txid)")
    p.add_argument("--db", metavar="URL", help=f"the application database (default ${ENV_APP_DB})")
    p.add_argument(
        "--actor", help="who reverts, recorded with the change (required, but for --dry-run)"
    )
    p.add_argument("--reason", help="why, recorded with the change")
    p.add_argument("--dry-run", action="store_true", help="report conflicts; change nothing")
    p.add_argument("--since", metavar="TIME", help="look for a transaction's changes back to here")
    p.add_argument(
        "--config",
        help="TOML of the tracked tables ([[track]]): for a database captured through "
        "SQLAlchemy, so the revert's own changes are captured too",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "home"):
        args.home = None
    if not hasattr(args, "store"):
        args.store = os.environ.get(ENV_STORE) or None
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        return int(args.func(args))
    except (InvalidEvent, ConflictError, IntegrityError, NotFound) as exc:
        _err(escape_text(str(exc)))
        return EXIT_FAIL
    except (SealtrailError, FormatError) as exc:
        _err(escape_text(str(exc)))
        return EXIT_ERROR
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return EXIT_OK
    except OSError as exc:
        _err(escape_text(f"{exc.strerror or exc}"))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
