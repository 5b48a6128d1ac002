"""The real RecordWriter and spool with a gate on the disk: tests of durable_before_forward
shut it to see what an enforcer forwards before its records are stored."""
from __future__ import annotations

import threading

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from records.batch import decode_batch
from records.spool import Spool
from records.writer import RecordWriter


class GatedWriter:
    """The real writer and spool, whose appends wait while the gate is shut: a disk that has not
    taken the batch yet."""

    def __init__(self, tmp_path):
        self.spool = Spool(str(tmp_path / "spool"))
        self.writer = RecordWriter("agent-durable", Ed25519PrivateKey.generate(), str(tmp_path / "state"),
                                   self.spool, batch_max_delay=0.1)
        self.gate = threading.Event()
        self.gate.set()
        real_append = self.spool.append

        def append(data, **kwargs):
            self.gate.wait(30)
            return real_append(data, **kwargs)
        self.spool.append = append

    def stored(self, event_type: str) -> list[dict]:
        """The fields of every stored event of that type."""
        return [event["f"] for _, data in self.spool.pending() for event in decode_batch(data).events
                if event["type"] == event_type]

    def stored_texts(self) -> list[str]:
        return [f["text"] for f in self.stored("pg.statement")]

    def close(self):
        self.gate.set()
        self.writer.close()
        self.spool.close()
