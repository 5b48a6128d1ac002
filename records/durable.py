"""Making file system changes survive power loss."""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """A new, renamed or deleted name is only durable once its directory is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
