"""Process-local counters and the Prometheus text exposition (format 0.0.4)."""
from __future__ import annotations

import threading
from collections import defaultdict


class Counters:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = defaultdict(float)

    def inc(self, name: str, amount: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] += amount

    def get(self, name: str, **labels) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0)

    def items(self):
        with self._lock:
            return list(self._values.items())


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Exposition:
    """Builds the text body: HELP/TYPE once per metric, then samples."""

    def __init__(self):
        self._lines: list[str] = []
        self._declared: set[str] = set()

    def sample(self, name: str, kind: str, help_text: str, value: float, labels: tuple = ()) -> None:
        if name not in self._declared:
            self._declared.add(name)
            self._lines.append(f"# HELP {name} {help_text}")
            self._lines.append(f"# TYPE {name} {kind}")
        number = int(value) if float(value).is_integer() else value
        self._lines.append(f"{name}{_labels(labels)} {number}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


COUNTER_HELP = {
    "warden_collector_ingest_batches_total": "Batches received by this collector process, by result.",
    "warden_collector_ingest_events_total": "Events accepted by this collector process.",
    "warden_collector_verify_failures_total": "Batches or tokens that failed verification, by reason.",
    "warden_collector_enrollments_total": "Agent enrollments, by result.",
}


def render(counters: Counters, gauges: list[tuple[str, str, float, tuple]]) -> str:
    out = Exposition()
    for name, help_text in COUNTER_HELP.items():
        samples = [(labels, value) for (n, labels), value in counters.items() if n == name]
        if not samples:
            out.sample(name, "counter", help_text, 0)
        for labels, value in sorted(samples):
            out.sample(name, "counter", help_text, value, labels)
    for name, help_text, value, labels in gauges:
        out.sample(name, "gauge", help_text, value, labels)
    return out.text()
