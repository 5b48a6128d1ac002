#!/usr/bin/env python3
"""`make bench`: run every benchmark script in bench/ and print one table of their results.

Each script prints a last line `BENCH {json}`; its figures are shown as they are.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    # _*.py are helpers the benches share, not benches
    scripts = sorted(p for p in glob.glob(os.path.join(HERE, "*.py"))
                     if os.path.basename(p) != "run_all.py" and not os.path.basename(p).startswith("_"))
    only = sys.argv[1:]
    results = []
    failed = 0
    for path in scripts:
        name = os.path.basename(path)[:-3]
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=1800)
        sys.stdout.write(proc.stdout)
        bench_line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("BENCH ")), None)
        if proc.returncode != 0 or bench_line is None:
            failed += 1
            sys.stdout.write(proc.stderr[-3000:])
            results.append((name, {"error": f"exit {proc.returncode}"}, time.time() - t0))
            continue
        results.append((name, json.loads(bench_line[6:]), time.time() - t0))
    print("\n" + "=" * 100)
    print(f"{'benchmark':22} {'seconds':>8}  figures")
    for name, figures, secs in results:
        flat = ", ".join(f"{k}={v}" for k, v in figures.items() if k not in ("bench",) and not isinstance(v, (dict, list)))
        print(f"{name:22} {secs:8.1f}  {flat}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
