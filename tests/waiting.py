"""Polling for a condition another thread or process brings about."""
import time


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """True as soon as predicate() is; after `timeout` seconds, its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
