"""The database server's work per captured one-row update, counted in instructions.

    .venv/bin/python bench/capture_server_instructions.py [--transactions 1000]

``bench/capture_server_bench.py`` times the server's CPU; on a shared machine its rounds
still differ by 10% or more, too much to see a change of a few percent to the generated
SQL. This counts instead: the same workload (a ``DO`` loop of one-row ``UPDATE ...;
COMMIT`` with an audit context, ``synchronous_commit = off``) runs in a single-user
PostgreSQL backend under valgrind's callgrind, which counts the instructions executed.
Each variant runs twice, with a short and a long loop, and the difference over the extra
transactions is the count per transaction (start-up and warm-up cancel). Same binary,
same input: repeated runs agree to within about 0.1%, whatever else the machine does.

Variants, each on a fresh install, with one part of the capture replaced so that its
share shows:

* ``untracked``: the same update of an uncaptured copy of the table (the baseline);
* ``tracked``: the capture as installed;
* ``no commit order``: the deferred commit-order trigger dropped;
* ``commit order fires, does nothing``: its function returns at once;
* ``capture function returns at once``: the statement trigger still fires, with its
  transition tables and settings, but writes nothing (and so nothing reaches the
  commit-order trigger).

Then the bulk workload, one ``UPDATE`` of all 10,000 rows, per row, untracked and tracked:
a change that makes the one-row path cheaper can make every row of a large statement
dearer (building the envelope with one ``format()`` call instead of its ``||`` chain took
13,600 instructions off a one-row transaction and put 3,200 on each row of the bulk
update, so it was not kept).

Needs valgrind and the PostgreSQL server binaries (``pg_config --bindir``, or the newest
``/usr/lib/postgresql/*/bin``); a private cluster is made in a temporary directory and
removed (as root, its processes run as the ``postgres`` user, which PostgreSQL requires).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import psycopg

# bench/ is the script's directory, so its sibling is importable: the same workload.
from capture_server_bench import CONTEXT, ROWS, create_tables

DATABASE = "bench"


def _bindir() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        if os.path.exists(os.path.join(out.stdout.strip(), "initdb")):
            return out.stdout.strip()
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if not found:
        sys.exit("no PostgreSQL server binaries (initdb) found")
    return os.path.dirname(found[-1])


class Cluster:
    """A private PostgreSQL cluster in ``root``, reached through its Unix socket."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.data = os.path.join(root, "data")
        self.bin = _bindir()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(root, entry.pw_uid, entry.pw_gid)
        self.port = 5400 + os.getpid() % 500

    def _cmd(self, *args: str) -> list[str]:
        return (["runuser", "-u", "postgres", "--"] if self.as_postgres else []) + list(args)

    def initdb(self) -> None:
        subprocess.run(
            self._cmd(f"{self.bin}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres"),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=''"
        subprocess.run(
            self._cmd(
                f"{self.bin}/pg_ctl",
                "-D",
                self.data,
                "-o",
                options,
                "-w",
                "-l",
                os.path.join(self.root, "log"),
                "start",
            ),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            self._cmd(f"{self.bin}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"),
            capture_output=True,
        )

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@/{database}?host={self.root}&port={self.port}"

    def count(self, script: str) -> int:
        """Instructions a single-user backend (server stopped) executes for ``script``."""
        out = os.path.join(self.root, "callgrind.out")
        with tempfile.TemporaryFile("w+") as stdin:
            stdin.write(script)
            stdin.seek(0)
            run = subprocess.run(
                self._cmd(
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}",
                    f"{self.bin}/postgres",
                    "--single",
                    "-j",
                    "-D",
                    self.data,
                    DATABASE,
                ),
                stdin=stdin,
                capture_output=True,
                text=True,
            )
        errors = [line for line in run.stdout.splitlines() if "ERROR" in line]
        if run.returncode != 0 or errors:
            sys.exit(f"the single-user backend failed: {errors or run.stderr[-2000:]}")
        found = re.search(r"Collected : (\d+)", run.stderr)
        if found is None:
            sys.exit(f"no instruction count from callgrind: {run.stderr[-2000:]}")
        return int(found.group(1))


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    root = tempfile.mkdtemp(prefix="sealtrail-cg-")
    c = Cluster(root)
    try:
        c.initdb()
        c.start()
        with psycopg.connect(c.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        c.stop()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _loop(table: str, n: int) -> str:
    body = (
        f"BEGIN FOR i IN 1..{n} LOOP "
        f"PERFORM set_config('sealtrail.context', '{CONTEXT}', true); "
        f"UPDATE {table} SET balance = balance + 1 WHERE id = i % {ROWS} + 1; "
        "COMMIT; END LOOP; END"
    )
    return f"SET synchronous_commit = off;\n\nDO $bench$ {body} $bench$;\n"


def _bulk(table: str, n: int) -> str:
    """``n`` updates of every row, each committed (the bulk workload)."""
    return "SET synchronous_commit = off;\n\n" + "".join(
        f"UPDATE {table} SET balance = balance + 1;\n\n" for _ in range(n)
    )


def _setup(conn: psycopg.Connection[object]) -> None:
    """Fresh tables and a fresh install (what a variant replaced is gone)."""
    from sealtrail.capture import pg
    from sealtrail.capture.change import Track

    conn.execute("DROP SCHEMA public CASCADE")
    conn.execute("CREATE SCHEMA public")
    create_tables(conn)
    pg.install(conn, [Track.of("public.accounts")], ddl_watch=False)


def _replace_body(conn: psycopg.Connection[object], name_like: str, body: str) -> None:
    """Give the function named like ``name_like`` a new plpgsql body, keeping its header
    (security mode, settings)."""
    row = conn.execute(
        "SELECT pg_get_functiondef(p.oid) FROM pg_proc p "
        "WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE %s",
        (name_like,),
    ).fetchone()
    assert row is not None, name_like
    definition = re.sub(
        r"AS \$function\$.*\$function\$",
        lambda _: f"AS $function$ {body} $function$",
        row[0],
        flags=re.S,
    )
    conn.execute(definition)  # type: ignore[arg-type]


VARIANTS: dict[str, tuple[str, Callable[[psycopg.Connection[object]], None] | None]] = {
    "untracked": ("plain", None),
    "tracked": ("accounts", None),
    "no commit order": (
        "accounts",
        lambda c: c.execute("DROP TRIGGER sealtrail_commit_order ON sealtrail_outbox"),
    ),
    "commit order fires, does nothing": (
        "accounts",
        lambda c: _replace_body(c, "sealtrail_commit_order", "BEGIN RETURN NULL; END"),
    ),
    "capture function returns at once": (
        "accounts",
        lambda c: _replace_body(c, "sealtrail_cap_%_update", "BEGIN RETURN NULL; END"),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--transactions", type=int, default=1000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed (Debian: apt-get install valgrind)")
    short, long = 100, 100 + args.transactions
    counts: dict[str, int] = {}
    with cluster() as c:
        for name, (table, change) in VARIANTS.items():
            c.start()
            with psycopg.connect(c.url(), autocommit=True) as conn:
                _setup(conn)
                if change is not None:
                    change(conn)
            c.stop()
            low, high = c.count(_loop(table, short)), c.count(_loop(table, long))
            counts[name] = (high - low) // args.transactions
            print(f"{name}: {counts[name]:,} instructions per transaction", file=sys.stderr)
        bulk: dict[str, int] = {}
        c.start()
        with psycopg.connect(c.url(), autocommit=True) as conn:
            _setup(conn)
        c.stop()
        for table, name in (("plain", "untracked"), ("accounts", "tracked")):
            low, high = c.count(_bulk(table, 1)), c.count(_bulk(table, 3))
            bulk[name] = (high - low) // (2 * ROWS)
            print(f"bulk, {name}: {bulk[name]:,} instructions per row", file=sys.stderr)
    base, full = counts["untracked"], counts["tracked"]
    print(
        f"\nInstructions per one-row update transaction (callgrind, single-user backend, "
        f"{args.transactions:,} transactions)\n"
    )
    print("| variant | instructions | added by capture | share of what capture adds |")
    print("|---|---|---|---|")
    for name, count in counts.items():
        added = count - base
        share = f"{added / (full - base):.0%}" if name != "untracked" else ""
        print(f"| {name} | {count:,} | {added:,} | {share} |")
    print(
        f"\nBulk: one UPDATE of all {ROWS:,} rows, instructions per row: untracked "
        f"{bulk['untracked']:,}, tracked {bulk['tracked']:,} "
        f"({bulk['tracked'] / bulk['untracked']:.2f}x)"
    )


if __name__ == "__main__":
    main()
