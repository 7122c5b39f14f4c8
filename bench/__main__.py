"""`python -m bench` (make bench): every benchmark in turn, figures printed, nothing asserted."""

from __future__ import annotations

import importlib
import sys

AREAS = ("dispatch", "checkip", "workers", "service", "recordings")
# Extra arguments per area when run by `make bench` (cold cache: skipped if not root).
ARGS = {"recordings": ["--cold"]}


def main(argv: list[str]) -> int:
    areas = argv or list(AREAS)
    for area in areas:
        print(f"\n######## bench.{area} ########", flush=True)
        module = importlib.import_module(f"bench.{area}")
        module.main(ARGS.get(area, []))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
