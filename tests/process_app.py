"""An application for the delivery tests: records in the best-effort mode with a
delivering process of its own (``deliver="process"``), announcing its deliverer's pid and
then each event after ``record`` returned, until it is killed.

Usage: python process_app.py HOME
"""

from __future__ import annotations

import sys
import time

import sealtrail


def main() -> None:
    trail = sealtrail.connect(sys.argv[1], mode="best-effort", deliver="process")
    assert trail.spool is not None and trail.spool.helper is not None
    print(f"helper {trail.spool.helper.pid}", flush=True)
    n = 0
    with sealtrail.context(actor="user:app"):
        while True:
            receipt = trail.record("process.test", data={"n": n})
            print(f"ok {n} {receipt.id}", flush=True)
            n += 1
            time.sleep(0.001)


if __name__ == "__main__":
    main()
