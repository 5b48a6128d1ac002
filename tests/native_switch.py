"""The C twins switched on or off: in a fresh interpreter (WARDEN_PURE_PYTHON), or the Postgres
session's C lanes in this one (`lanes`)."""
import contextlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def printed_with_pure_python(code: str, value: str) -> str:
    """What `python -c code` prints, run from the repository root with WARDEN_PURE_PYTHON=value."""
    env = dict(os.environ, WARDEN_PURE_PYTHON=value)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


@contextlib.contextmanager
def lanes(enabled: bool):
    """The Postgres session with its C lanes as built (enabled) or off, for the duration."""
    from enforcer.postgres import native
    from enforcer.postgres import session
    saved = session._lanes
    session._lanes = native.lanes if enabled else None
    try:
        yield
    finally:
        session._lanes = saved
