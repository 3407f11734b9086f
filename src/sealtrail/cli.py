"""The ``sealtrail`` command line (a thin layer over the library)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("sealtrail: command line under construction", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
