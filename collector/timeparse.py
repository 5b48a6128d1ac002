"""Times and durations as people type them: ISO-8601, relative ("2h" = two hours ago), epoch.

Everything inside the collector is integer nanoseconds since the epoch, UTC.
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone

_UNIT_NS = {
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
    "d": 86400 * 1_000_000_000,
    "w": 7 * 86400 * 1_000_000_000,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$", re.IGNORECASE)


class TimeFormatError(ValueError):
    pass


def now_ns() -> int:
    return time.time_ns()


def parse_duration_ns(text: str) -> int:
    """'5m', '8h', '90s', '1.5h', '2d' -> nanoseconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise TimeFormatError(
            f"bad duration {text!r}: use a number and a unit, e.g. 90s, 5m, 8h, 2d")
    return int(float(match.group(1)) * _UNIT_NS[match.group(2).lower()])


def parse_time_ns(text: str | int, *, now: int | None = None) -> int:
    """ISO-8601 (naive means UTC), a relative age ('2h' = 2 hours ago), 'now',
    or a bare integer: epoch seconds (<= 1e11), milliseconds (<= 1e14) or nanoseconds."""
    if isinstance(text, int):
        return _epoch_number_to_ns(text)
    value = str(text).strip()
    current = now if now is not None else now_ns()
    if value.lower() == "now":
        return current
    if _DURATION.match(value):
        return current - parse_duration_ns(value)
    if re.fullmatch(r"-?\d+", value):
        return _epoch_number_to_ns(int(value))
    iso = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        parsed = datetime.fromisoformat(iso)
    except ValueError:
        raise TimeFormatError(
            f"bad time {text!r}: use ISO-8601 (2024-05-01T02:15:00Z), a relative age "
            f"(2h, 30m) or epoch seconds") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    # Exact integer arithmetic: floats lose nanoseconds at this magnitude.
    delta = parsed - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


_MAX_NS = 2**63 - 1        # what a signed 64-bit column holds (year 2262)


def _epoch_number_to_ns(number: int) -> int:
    if abs(number) <= 10**11:
        ns = number * 1_000_000_000
    elif abs(number) <= 10**14:
        ns = number * 1_000_000
    else:
        ns = number
    if abs(ns) > _MAX_NS:
        raise TimeFormatError(f"time {number} is out of range: use epoch seconds, milliseconds or "
                              f"nanoseconds before the year 2262")
    return ns


def format_ns(ts_ns: int | None) -> str | None:
    """Nanoseconds -> ISO-8601 UTC with microseconds and a Z."""
    if ts_ns is None:
        return None
    seconds, rest = divmod(int(ts_ns), 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc).replace(microsecond=rest // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
