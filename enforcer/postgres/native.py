"""enforcer/postgres/_pglanes.c, the Postgres steady state in C, when it is built and not switched
off with WARDEN_PURE_PYTHON=1; else None, and every caller keeps to its Python code. session.py
configures it with its classes and constants when it is imported."""
import os

try:
    from . import _pglanes as lanes
except ImportError:
    lanes = None
if os.environ.get("WARDEN_PURE_PYTHON") == "1":
    lanes = None
