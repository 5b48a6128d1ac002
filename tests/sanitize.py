"""Warden's C modules under AddressSanitizer and UndefinedBehaviorSanitizer.

    python -m tests.sanitize [--quick | --scale X] [--keep]

records/_seal.c, enforcer/masking/_pgrows.c and enforcer/postgres/_pglanes.c parse bytes from
both network legs and build the evidence, so a memory error there is a security bug even when
every output looks right. This builds the three with ASan and UBSan in a scratch copy of the
tree and runs there, with Python's allocator switched to malloc (so every bytes object has
red zones, not a slot in a shared arena):

1. the unit tests that drive the C modules, including their differential tests against the
   Python code each one stands in for;
2. every fuzz target (`tests.fuzz.run`), at the given scale.

Any sanitizer report fails the run, and so does a failing test or fuzz target. The last line
is `RESULT {json}`. `make fuzz` runs this after the plain fuzz run; `--quick` is the CI size.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("records/_seal", "enforcer/masking/_pgrows", "enforcer/postgres/_pglanes")
SANITIZE = "-fsanitize=address,undefined -fno-omit-frame-pointer"
# The unit tests that reach the C modules. Those that start PostgreSQL are left out: its
# server processes would inherit the sanitizer runtime.
UNIT_TESTS = ("test_pg_lanes.py", "test_pgrow_native.py", "test_records_*.py", "test_pg_session*.py",
              "test_pg_decisions.py", "test_pg_fastpath.py", "test_pg_protocol.py", "test_masking_*.py",
              "test_pg_shape_memo.py", "test_pg_sql_execute.py", "test_pg_function_calls.py",
              "test_pg_param_types.py")
QUICK_SCALE = 0.03


def runtime_library(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"sanitize: gcc has no {name} (install gcc with its sanitizer runtimes, "
                         f"e.g. `apt-get install gcc`, which brings libasan and libubsan)")
    return path


def scratch_tree(keep: bool) -> str:
    tree = tempfile.mkdtemp(prefix="warden-sanitize-")
    if not keep:
        import atexit
        atexit.register(shutil.rmtree, tree, True)
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so")
    for entry in os.listdir(ROOT):
        src = os.path.join(ROOT, entry)
        if entry in (".git", ".venv", "build", "dist") or entry.endswith(".egg-info"):
            continue
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(tree, entry), ignore=skip)
        else:
            shutil.copy2(src, tree)
    return tree


def build(tree: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WARDEN_PURE"}
    env.update(CFLAGS=f"{SANITIZE} -g -O1", LDFLAGS=SANITIZE)
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sanitize: building the C modules with sanitizers failed:\n{done.stdout}{done.stderr}")
    missing = [m for m in MODULES if not glob.glob(os.path.join(tree, m + ".*.so"))]
    if missing:
        raise SystemExit(f"sanitize: the build made no module for {', '.join(missing)}")


def sanitized_env(reports: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WARDEN_PURE", "WARDEN_PURE_PYTHON", "PYTHONPATH")}
    env.update(
        LD_PRELOAD=f"{runtime_library('libasan.so')}:{runtime_library('libubsan.so')}",
        PYTHONMALLOC="malloc",
        # leaks: CPython keeps interned objects to the end, which LeakSanitizer would report
        ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:log_path={reports}",
        UBSAN_OPTIONS=f"print_stacktrace=1:halt_on_error=1:log_path={reports}",
    )
    return env


def check_imports(tree: str, env: dict) -> None:
    """The run must exercise the sanitized modules, not the ones built in the working tree."""
    code = ("import importlib, os, sys\n"
            f"for name in {[m.replace('/', '.') for m in MODULES]!r}:\n"
            "    path = importlib.import_module(name).__file__\n"
            "    if not path.startswith(os.getcwd() + os.sep): sys.exit(f'{name} came from {path}')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sanitize: the sanitized modules are not the ones imported: {done.stdout}{done.stderr}")


def run_step(name: str, argv: list[str], tree: str, env: dict, reports: str) -> dict:
    started = time.monotonic()
    done = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True)
    found = sorted(glob.glob(reports + ".*"))
    texts = []
    for path in found:
        with open(path, errors="replace") as f:
            texts.append(f.read())
        os.unlink(path)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    step = {"step": name, "returncode": done.returncode, "sanitizer_reports": len(texts),
            "seconds": round(time.monotonic() - started, 1), "ok": done.returncode == 0 and not texts}
    print(f"{name:<12} {'PASS' if step['ok'] else 'FAIL'}  exit {done.returncode}, "
          f"{len(texts)} sanitizer reports, {step['seconds']} s", flush=True)
    if not step["ok"]:
        for text in texts[:3]:
            print(text[:6000])
        print("\n".join("    " + line for line in tail))
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sanitize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fuzz at the CI size (a few thousand inputs per core)")
    parser.add_argument("--scale", type=float, help="multiply every fuzz target's count (overrides --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch tree (its path is printed)")
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (QUICK_SCALE if args.quick else 1.0)

    tree = scratch_tree(args.keep)
    print(f"sanitize: building {', '.join(m + '.c' for m in MODULES)} with ASan and UBSan in {tree}", flush=True)
    build(tree)
    reports = os.path.join(tree, "sanitizer-report")
    env = sanitized_env(reports)
    check_imports(tree, env)

    tests = sorted({os.path.relpath(p, tree) for pattern in UNIT_TESTS
                    for p in glob.glob(os.path.join(tree, "tests", "unit", pattern))})
    steps = [
        run_step("unit tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], tree, env, reports),
        run_step("fuzz", ["-m", "tests.fuzz.run", "--scale", str(scale)], tree, env, reports),
    ]
    ok = all(s["ok"] for s in steps)
    print("RESULT " + json.dumps({"ok": ok, "scale": scale, "unit_test_files": len(tests), "steps": steps}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
