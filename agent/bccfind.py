"""Find and import BCC's Python module, which distributions ship outside PyPI.

Debian/Ubuntu put it in /usr/lib/python3/dist-packages; Amazon Linux 2023 and RHEL 9
under the system Python's site-packages (e.g. /usr/lib/python3.9/site-packages). The
module is pure Python over libbcc.so, so it works from any Python 3 that can load it.
We import only the `bcc` package itself, never the whole foreign site-packages, which
would shadow our own newer copies of other libraries.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import sys
import sysconfig
from types import ModuleType

SEARCH_PATTERNS = (
    "/usr/lib/python3/dist-packages/bcc",
    "/usr/lib/python3*/site-packages/bcc",
    "/usr/lib64/python3*/site-packages/bcc",
    "/usr/local/lib/python3*/dist-packages/bcc",
    "/usr/local/lib/python3*/site-packages/bcc",
)


class BccNotFound(RuntimeError):
    pass


def candidate_dirs() -> list[str]:
    found: list[str] = []
    for pattern in SEARCH_PATTERNS:
        for path in sorted(glob.glob(pattern), reverse=True):
            if os.path.isfile(os.path.join(path, "__init__.py")) and path not in found:
                found.append(path)
    return found


def import_bcc() -> ModuleType:
    """Return the `bcc` module, loading it from the distribution's location if needed."""
    if "bcc" in sys.modules:
        return sys.modules["bcc"]
    try:
        return importlib.import_module("bcc")
    except ImportError:
        pass
    for path in candidate_dirs():
        spec = importlib.util.spec_from_file_location(
            "bcc", os.path.join(path, "__init__.py"), submodule_search_locations=[path])
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules["bcc"]
            continue
        return module
    raise BccNotFound(
        "BCC's Python module was not found. Install it: Debian/Ubuntu `apt-get install python3-bpfcc`, "
        "Amazon Linux 2023 / RHEL 9 `dnf install python3-bcc`.")


def link_into_venv(venv: str) -> str:
    """Make `import bcc` work in a venv by linking only the bcc package into it."""
    purelib = sysconfig.get_paths(vars={"base": venv, "platbase": venv})["purelib"]
    target = os.path.join(purelib, "bcc")
    dirs = candidate_dirs()
    if not dirs:
        raise BccNotFound("no system bcc module to link; install python3-bpfcc first")
    if os.path.islink(target) and os.readlink(target) == dirs[0]:
        return target
    if os.path.lexists(target):
        os.remove(target)
    os.symlink(dirs[0], target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description="Locate BCC's Python module")
    parser.add_argument("--link", metavar="VENV", help="link the bcc package into this venv")
    args = parser.parse_args()
    if args.link:
        print(f"bcc linked: {link_into_venv(args.link)}")
    else:
        print(import_bcc().__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
