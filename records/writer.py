"""RecordWriter: the one way the enforcer and the agent write records.

``emit`` only validates and enqueues (no disk I/O, safe from asyncio code and any
thread). A background thread assigns sequence numbers, chains, batches, signs,
compresses and appends to the spool. The chain head (last seq + last hash) is
recovered at start from the spool's newest frame and from ``<state_dir>/chain-head``,
whichever is further along, so numbering stays gapless and monotonic across restarts.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from records.batch import CURRENT_DICTIONARY, BatchBuilder, BatchFormatError, decode_batch
from records.codec import GENESIS_HASH
from records.schema import validate_fields
from records.spool import Spool, SpoolFull

log = logging.getLogger("warden.records")

DEFAULT_BACKLOG_CAP = 2_000_000
_RETRY_FULL_S = 0.2
_STATE_FILE = "chain-head"


class RecordBacklogFull(RuntimeError):
    """The spool is full and the in-memory backlog reached its cap: the caller must
    stop producing governed traffic (close the session) rather than lose evidence."""


class _Flush:
    __slots__ = ("done",)

    def __init__(self):
        self.done = threading.Event()


class RecordWriter:
    def __init__(self, agent_id: str, key: Ed25519PrivateKey, state_dir: str, spool: Spool,
                 batch_max_events: int = 512, batch_max_delay: float = 0.5,
                 backlog_cap: int = DEFAULT_BACKLOG_CAP, dictionary=CURRENT_DICTIONARY):
        self.agent_id = agent_id
        self.dictionary = dictionary     # zstd dictionary for new batches (None: none)
        self.key = key
        self.state_dir = state_dir
        self.spool = spool
        self.batch_max_events = batch_max_events
        self.batch_max_delay = batch_max_delay
        self.backlog_cap = backlog_cap
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.last_seq, self.last_hash = self._recover_chain_head()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._held: bytes | None = None       # a batch the full spool refused
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="warden-records", daemon=True)
        self._thread.start()

    # -- chain head --------------------------------------------------------------------
    def _recover_chain_head(self) -> tuple[int, bytes]:
        best = (0, GENESIS_HASH)
        try:
            with open(os.path.join(self.state_dir, _STATE_FILE), "rb") as handle:
                data = handle.read()
            if len(data) == 40:
                best = (int.from_bytes(data[:8], "little"), data[8:])
        except FileNotFoundError:
            pass
        frame = self.spool.last_frame()
        if frame is not None:
            try:
                batch = decode_batch(frame)
            except BatchFormatError as exc:
                log.error("newest spool frame is unreadable (%s); continuing the chain "
                          "from the state file", exc)
            else:
                if batch.last_seq > best[0]:
                    best = (batch.last_seq, batch.last_hash)
        return best

    def _save_chain_head(self) -> None:
        temp = os.path.join(self.state_dir, f"{_STATE_FILE}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self.last_seq.to_bytes(8, "little") + self.last_hash)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, os.path.join(self.state_dir, _STATE_FILE))

    # -- producer side -----------------------------------------------------------------
    def emit(self, event_type: str, fields: dict, session_id: str | None = None) -> None:
        validate_fields(event_type, fields)
        if self._closing:
            raise RuntimeError("RecordWriter is closed")
        if self._held is not None and self._queue.qsize() >= self.backlog_cap:
            raise RecordBacklogFull(
                f"record backlog reached {self.backlog_cap} events while the spool "
                f"{self.spool.path} is full; end the session (no evidence, no access)")
        self._queue.put((time.time_ns(), session_id, event_type, fields))

    @property
    def full(self) -> bool:
        return self._held is not None or self.spool.full

    def flush(self, timeout: float = 5.0) -> None:
        marker = _Flush()
        self._queue.put(marker)
        if not marker.done.wait(timeout):
            raise TimeoutError(f"records not durable within {timeout} s"
                               + (" (spool full)" if self.full else ""))

    def close(self, timeout: float = 10.0) -> None:
        if self._closing:
            return
        try:
            self.flush(timeout)
        finally:
            self._closing = True
            self._queue.put(None)
            self._thread.join(timeout)
            if self._held is None:
                self._save_chain_head()

    # -- background thread ---------------------------------------------------------------
    def _run(self) -> None:
        pending: BatchBuilder | None = None
        flushes: list[_Flush] = []
        deadline = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = False
            stop = item is None
            if isinstance(item, tuple):
                if pending is None:
                    pending = self._new_batch()
                self._seal(pending, item)
                if deadline is None:
                    deadline = time.monotonic() + self.batch_max_delay
                # Drain what is already queued without waiting.
                while pending.count < self.batch_max_events:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, tuple):
                        self._seal(pending, item)
                    elif item is None:
                        stop = True
                        break
                    else:
                        flushes.append(item)
                        break
            elif isinstance(item, _Flush):
                flushes.append(item)
            cut = (stop or flushes or (pending is not None
                                       and pending.count >= self.batch_max_events)
                   or (deadline is not None and time.monotonic() >= deadline))
            if cut:
                if pending is not None and pending.count:
                    full_since = self._store(pending)
                    if full_since:
                        # The full spool delayed these events; say so in the chain itself,
                        # before any waiting flush() returns.
                        alerts = self._new_batch()
                        self._seal(alerts, (full_since[0], None, "agent.alert", {
                            "kind": "spool_full", "severity": "critical",
                            "message": full_since[1]}))
                        self._seal(alerts, (time.time_ns(), None, "agent.alert", {
                            "kind": "spool_space_restored", "severity": "warning",
                            "message": "the record spool has space again; events "
                                       "were held in memory meanwhile, none dropped"}))
                        self._store(alerts)
                pending = None
                deadline = None
                for marker in flushes:
                    marker.done.set()
                flushes = []
            if stop:
                return

    def _new_batch(self) -> BatchBuilder:
        return BatchBuilder(self.agent_id, self.last_hash, self.last_seq + 1)

    def _seal(self, batch: BatchBuilder, item: tuple) -> None:
        ts, sid, event_type, fields = item
        try:
            self.last_hash = batch.add(ts, sid, event_type, fields)
        except (TypeError, ValueError, OverflowError) as exc:
            # A producer handed us a value msgpack cannot encode. Losing the event (or, worse,
            # this thread and every event after it) is not an option: record it with such
            # values in their text form, and say so in the chain.
            safe = _encodable(fields)
            safe["x_encoding_repaired"] = True
            self.last_hash = batch.add(ts, sid, event_type, safe)
            self.last_seq = batch.last_seq
            self.last_hash = batch.add(time.time_ns(), sid, "agent.alert", {
                "kind": "unencodable_event", "severity": "error",
                "message": f"{event_type} carried a value that could not be encoded ({exc}); "
                           f"it was recorded in text form"})
        self.last_seq = batch.last_seq

    def _store(self, batch: BatchBuilder) -> tuple[int, str] | None:
        """Append one batch, waiting while the spool is full; if it was full, return
        when that started and why."""
        data = batch.finish(self.key, dictionary=self.dictionary)
        events = batch.count
        while True:
            try:
                self.spool.append(data)
            except SpoolFull as exc:
                if self._held is None:
                    self._held = data
                    full_since = (time.time_ns(), str(exc))
                    log.error("%s", exc)
                if self._closing:
                    log.error("closing with %d events not in the spool (it is full)",
                              events)
                    return None
                time.sleep(_RETRY_FULL_S)
                continue
            break
        if self._held is None:
            return None
        self._held = None
        log.warning("spool %s has space again", self.spool.path)
        return full_since


def _encodable(value):
    """The same data with anything msgpack cannot carry turned into plain types or text."""
    if isinstance(value, dict):
        return {str(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_encodable(v) for v in value), key=repr)
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes, float)):
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 64) else str(value)
    return str(value)
