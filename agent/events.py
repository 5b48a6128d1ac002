"""Where the agent's events go: the tamper-evident record writer, plus an optional JSON-lines log."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from typing import Optional


def new_session_id() -> str:
    """UUIDv7: time-ordered, so sessions sort by start time."""
    try:
        from records.schema import new_session_id as records_session_id
        return records_session_id()
    except ImportError:
        ms = time.time_ns() // 1_000_000
        rand = int.from_bytes(os.urandom(10), "big")
        value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
        return str(uuid.UUID(int=value))


def _jsonable(value):
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


class JsonLinesSink:
    """Human-readable copy of every event (stdout or a file); not the evidence."""

    def __init__(self, target: str = "-"):
        self._lock = threading.Lock()
        self._file = sys.stdout if target == "-" else open(target, "a", buffering=1)

    def emit(self, event_type: str, fields: dict, session_id: Optional[str] = None) -> None:
        line = json.dumps({"ts": time.time_ns(), "type": event_type, "sid": session_id, "f": fields},
                          default=_jsonable, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()


class FanoutSink:
    def __init__(self, *sinks):
        self.sinks = [s for s in sinks if s is not None]

    def emit(self, event_type: str, fields: dict, session_id: Optional[str] = None) -> None:
        for sink in self.sinks:
            sink.emit(event_type, fields, session_id)
