"""A writer process for the crash test: appends batches forever, announcing each commit.

Usage: python crash_writer.py HOME RUN. After each batch commits it prints ``ack N``: the
first N events of this run are durable. The parent kills it with SIGKILL at random moments.
"""

from __future__ import annotations

import sys

from sealtrail.home import open_ledger
from sealtrail.ledger import CheckpointPolicy


def event_id(run: int, n: int) -> str:
    return f"{run:08x}-0000-7000-8000-{n:012x}"


def main() -> None:
    home, run = sys.argv[1], int(sys.argv[2])
    ledger = open_ledger(home)
    ledger.policy = CheckpointPolicy(every_events=500, every_seconds=0)
    n = 0
    batch = 1 + (run * 37) % 300
    while True:
        events = [
            {
                "id": event_id(run, n + i),
                "action": "crash.test",
                "actor": {"id": f"writer:{run}"},
                "data": {"n": n + i, "pad": "x" * (run % 50)},
            }
            for i in range(batch)
        ]
        ledger.append_many(events)
        n += batch
        sys.stdout.write(f"ack {n}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
