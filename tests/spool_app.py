"""An application process for the delivery test: records events in the best-effort mode
through a spool, announcing each one after ``record`` returned.

Usage: python spool_app.py HOME TARGET SPOOL record|drain. ``record`` records forever and
prints ``ok <n> <event id>`` after each; ``drain`` records nothing, delivers what the spool
holds, prints ``drained <backlog>`` and exits.
"""

from __future__ import annotations

import sys
import time

import sealtrail
from sealtrail.spool import Backoff


def main() -> None:
    home, target, spool, what = sys.argv[1:5]
    trail = sealtrail.connect(target, home=home, mode="best-effort", spool=spool)
    sink = trail.spool
    assert sink is not None
    sink.backoff = Backoff(base=0.05, cap=0.5)
    if what == "drain":
        ok = sink.flush(timeout=90)
        print(f"drained {sink.stats().backlog} {ok}", flush=True)
        trail.close()
        return
    n = 0
    with sealtrail.context(actor="user:app", request_id="spool-test"):
        while True:
            receipt = trail.record("spool.test", data={"n": n})
            sys.stdout.write(f"ok {n} {receipt.id}\n")
            sys.stdout.flush()
            n += 1
            time.sleep(0.002)


if __name__ == "__main__":
    main()
