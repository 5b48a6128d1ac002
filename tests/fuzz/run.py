"""`make fuzz`: every fuzz target, one table, `RESULT {json}` last; exit 0 only if all passed.

    python -m tests.fuzz.run [--quick] [--scale X] [--seed N]

Full mode feeds at least 100,000 inputs to each core (Postgres, HTTP, and the C modules against
their Python references); --quick a few thousand. Pure in-process work: no network, no files.
`python -m tests.sanitize` runs the same targets on the C modules built with ASan and UBSan.
"""
from __future__ import annotations

import argparse
import json
import sys

from tests.fuzz import http, native, pg
from tests.fuzz.common import Stats

# (target, core, kind, full-mode count); stateful counts are programs of up to 40 steps each
PLAN = (
    ("pg_client_mutated", "postgres", "mutation", 70_000),
    ("pg_server_mutated", "postgres", "mutation", 40_000),
    ("pg_client_generated", "postgres", "hypothesis", 6_000),
    ("pg_server_generated", "postgres", "hypothesis", 4_000),
    ("pg_stateful", "postgres", "stateful", 1_000),
    ("http_request_mutated", "http", "mutation", 70_000),
    ("http_response_mutated", "http", "mutation", 40_000),
    ("http_request_generated", "http", "hypothesis", 6_000),
    ("http_response_generated", "http", "hypothesis", 4_000),
    ("native_lanes_mutated", "native", "mutation", 60_000),
    ("native_rows_mutated", "native", "mutation", 40_000),
)
QUICK_SCALE = 0.03
MIN_PER_CORE_FULL = 100_000


def run_target(name: str, kind: str, count: int, seed: int) -> Stats:
    module = pg if name.startswith("pg_") else native if name.startswith("native_") else http
    if kind == "mutation":
        return module.mutation_target(name, count, seed)
    if kind == "hypothesis":
        return module.hypothesis_target(name, count)
    return pg.stateful_target(name, count)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few thousand inputs per core (CI, smoke test)")
    parser.add_argument("--scale", type=float, help="multiply every target's count (overrides --quick)")
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the mutation targets")
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (QUICK_SCALE if args.quick else 1.0)
    rows = []
    per_core: dict[str, int] = {}
    all_ok = True
    for name, core, kind, full in PLAN:
        count = max(10, int(full * scale))
        stats = run_target(name, kind, count, args.seed)
        per_core[core] = per_core.get(core, 0) + stats.inputs
        all_ok &= stats.ok
        rows.append({"target": name, "core": core, "kind": kind, "inputs": stats.inputs,
                     "rejected": stats.rejected, "checked": "-" if stats.checked is None else stats.checked,
                     "crashes": stats.crashes, "violations": stats.violations,
                     "hangs": stats.hangs, "time_s": round(stats.seconds, 1), "result": "PASS" if stats.ok else "FAIL",
                     "examples": stats.examples})
        checked = "" if stats.checked is None else f"  {stats.checked} checked"
        print(f"{name:<24} {stats.inputs:>8} inputs{checked}  {stats.crashes} crashes  {stats.violations} violations  "
              f"{stats.hangs} hangs  {stats.seconds:.1f}s  {'PASS' if stats.ok else 'FAIL'}", flush=True)
        for example in stats.examples[:3]:
            print(f"    {example['kind']}: {example['error']}\n      input: {example['input'][:200]}", flush=True)
    enough = scale < 1.0 or all(v >= MIN_PER_CORE_FULL for v in per_core.values())
    if not enough:
        print(f"fewer than {MIN_PER_CORE_FULL} inputs for a core: {per_core}")
    columns = ("target", "inputs", "rejected", "checked", "crashes", "violations", "hangs", "time_s", "result")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print()
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in columns))
    print("per core: " + ", ".join(f"{core} {n} inputs" for core, n in per_core.items()))
    ok = all_ok and enough
    print("RESULT " + json.dumps({"ok": ok, "scale": scale, "per_core": per_core, "targets": rows}, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
