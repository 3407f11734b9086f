"""A relay process for the kill test: ``relay_kill_worker.py APP_URL HOME CRASH_AT [WORKERS]``.

It runs the relay loop until SIGTERM. With CRASH_AT = k > 0 it SIGKILLs itself at the k-th
acknowledgement, in one of the windows that matter most: for odd k after the ledger
committed the batch and before the outbox rows are deleted, for even k after the DELETE ran
but before its COMMIT. The test SIGKILLs it from outside at random moments as well.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from sealtrail.capture.relay import OutboxRow, Relay
from sealtrail.home import open_ledger


def main(argv: Sequence[str]) -> None:
    app_url, home, crash_at = argv[0], argv[1], int(argv[2])
    ledger = open_ledger(home)
    workers = int(argv[3]) if len(argv) > 3 else 0
    relay = Relay(
        app_url, ledger, batch=40, poll=0.02, backoff=0.05, max_backoff=0.3, workers=workers
    )
    real = relay._outbox.acknowledge
    calls = 0

    def acknowledge(conn: Any, rows: Sequence[OutboxRow]) -> None:
        nonlocal calls
        calls += 1
        if calls == crash_at and crash_at % 2:
            os.kill(os.getpid(), signal.SIGKILL)  # committed in the ledger, not deleted
        real(conn, rows)
        if calls == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # deleted, not committed

    relay._outbox.acknowledge = acknowledge  # type: ignore[method-assign]
    signal.signal(signal.SIGTERM, lambda *_: relay._stop.set())
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        relay.run()
    finally:
        relay.close()
        ledger.close()


if __name__ == "__main__":
    main(sys.argv[1:])
