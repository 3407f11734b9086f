"""A verification worker: ``python -m sealtrail._verify_worker``.

The parent writes one pickled job ``(store_url, [(start, end), ...], interesting_sizes,
chunk_level)`` to stdin; the worker opens its own connection and writes one length-prefixed
pickled :class:`~sealtrail.verify.ChunkResult` per chunk to stdout, in order. Explicit
subprocesses instead of :mod:`multiprocessing` because its "spawn" start method re-imports
the caller's ``__main__``, which breaks scripts without a main guard, and "fork" is unsafe
in threaded applications.
"""

from __future__ import annotations

import pickle
import sys

from sealtrail.store import open_store
from sealtrail.verify import check_chunk


def main() -> None:
    url, ranges, interesting, chunk_level = pickle.load(sys.stdin.buffer)
    out = sys.stdout.buffer
    store = open_store(url)
    try:
        for start, end in ranges:
            result = check_chunk(
                store.iter_entry_rows(start, end),
                start,
                end,
                interesting,
                store.iter_level,
                chunk_level,
            )
            data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
            out.write(len(data).to_bytes(8, "big"))
            out.write(data)
            out.flush()
    finally:
        store.close()


if __name__ == "__main__":
    main()
