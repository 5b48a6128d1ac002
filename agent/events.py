"""Where the agent's events go: the tamper-evident record writer, plus an optional JSON-lines log."""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import Optional


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

    def when_durable(self, callback) -> None:
        """The durable sink's when_durable (the record writer's); an error if none is."""
        for sink in self.sinks:
            wait = getattr(sink, "when_durable", None)
            if wait is not None:
                wait(callback)
                return
        from records.writer import RecordsNotDurable
        callback(RecordsNotDurable("no record writer among the event sinks"))


def fanout(*sinks):
    """One sink for all of `sinks` (None ones skipped): the only one itself, which keeps a
    call off every event's path, else a FanoutSink."""
    present = [s for s in sinks if s is not None]
    return present[0] if len(present) == 1 else FanoutSink(*present)
