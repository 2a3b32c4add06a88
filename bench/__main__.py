"""`make bench`: every benchmark, each printing figures as ratios against a baseline run
side by side in the same run (this machine is shared and noisy: absolute numbers drift,
ratios measured together hold).

    python -m bench              # all of them
    python -m bench gateway      # only bench/gateway_bench.py
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def main(selected: list[str]) -> int:
    names = sorted(p.stem.removesuffix("_bench") for p in _HERE.glob("*_bench.py"))
    for name in selected or names:
        if name not in names:
            print(f"bench: no benchmark named {name}; have {', '.join(names)}", file=sys.stderr)
            return 2
        print(f"\n=== {name} " + "=" * (60 - len(name)), flush=True)
        started = time.perf_counter()
        importlib.import_module(f"bench.{name}_bench").run()
        print(f"--- {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
