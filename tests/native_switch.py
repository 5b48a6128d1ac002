"""Run a snippet in a fresh interpreter with the C twins switched on or off (WARDEN_PURE_PYTHON)."""
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
