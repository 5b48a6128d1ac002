"""The agent's real recording path for benches: RecordWriter sealing events into a durable spool."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional


class SpoolSink:
    """An EventSink that records like the agent: chained, signed batches in a spool on disk.
    With no `directory` a temp dir is made and removed by close()."""

    def __init__(self, directory: Optional[str] = None):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from records.spool import Spool
        from records.writer import RecordWriter
        self._owned = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="warden-bench-spool-")
        self.spool = Spool(os.path.join(self.dir, "spool"), max_bytes=8 << 30)
        # batches cut as often as the agent's default spool.flush_interval makes them
        from agent.config import SpoolConfig
        self.writer = RecordWriter("bench-agent", Ed25519PrivateKey.generate(), os.path.join(self.dir, "state"),
                                   self.spool, batch_max_delay=SpoolConfig(path="").flush_interval)
        self.when_durable = self.writer.when_durable     # for durable_before_forward targets

    def emit(self, event_type: str, fields: dict, session_id: Optional[str] = None) -> None:
        # One frame, then the writer's emit, as in the agent: its sessions' contexts take the
        # agent itself as their sink (agent.daemon.Agent.emit, which also repairs schema
        # errors). The writer's per-session C emitter would be about 0.2 µs faster per event,
        # but the agent does not use it, so neither does the bench.
        self.writer.emit(event_type, fields, session_id)

    @property
    def count(self) -> int:
        """Events sealed so far: the chain's sequence numbers start at 1 in a fresh state dir."""
        return self.writer.chain_head()[0]

    def close(self):
        self.writer.close(60)
        self.spool.close()
        if self._owned:
            shutil.rmtree(self.dir, ignore_errors=True)
