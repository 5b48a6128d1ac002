"""RecordWriter: the one way the enforcer and the agent write records.

``emit`` validates the event and seals it into the open batch right away: sequence number,
canonical encoding and chain hash, a few microseconds of CPU on the caller's thread and no
disk I/O (safe from asyncio code and any thread). A background thread signs, compresses and
appends whole batches to the spool. Sealing on the producer's thread is cheaper than queueing
every event to another thread: that handed the GIL back and forth once per event, which cost
the enforcers more than the sealing itself.

With the native builder, an event goes into the open batch in one C call (``Builder.emit``:
validate, stamp, seal) that holds the GIL throughout, so concurrent producers need no lock;
a batch the writer cut is closed first, and an emit into a closed or full batch returns False
and takes the locked path, which cuts it and seals the event into the next batch before any
other thread can see that one. Only the writer closes a batch, under its lock. The chain head
of the open batch is the batch's own (``Builder.head``); ``last_seq``/``last_hash`` are the
head of what was cut.

A batch is cut when it holds ``batch_max_events`` events, when it is ``batch_max_delay``
seconds old, or on ``flush()``. The delay bounds how long an event waits for the disk; the
event cap only bounds memory, and is large because every batch the writer thread stores makes
it take the GIL several times (compress, write, fsync each release it), and each time it waits
through a storm of wake-ups while the event loop drops and retakes the GIL: with 512-event
batches that cost the HTTP enforcer a tenth of its throughput in context switches. The chain head (last seq + last hash) is recovered at start
from the spool's newest frame and from ``<state_dir>/chain-head``, whichever is further
along, so numbering stays gapless and monotonic across restarts.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from records.batch import CURRENT_DICTIONARY, BatchBuilder, BatchFormatError, decode_batch
from records.codec import GENESIS_HASH, MAX_DEPTH, NATIVE, EncodingError, _native
from records.schema import validate_fields
from records.spool import Spool, SpoolFull

if NATIVE:
    _native.set_validator(validate_fields)

log = logging.getLogger("warden.records")

DEFAULT_BACKLOG_CAP = 2_000_000
DEFAULT_BATCH_EVENTS = 8192
_RETRY_FULL_S = 0.2
_STATE_FILE = "chain-head"


class RecordBacklogFull(RuntimeError):
    """The spool is full and the in-memory backlog reached its cap: the caller must
    stop producing governed traffic (close the session) rather than lose evidence."""


class _Flush:
    __slots__ = ("done",)

    def __init__(self):
        self.done = threading.Event()


class _OpenBatch:
    """The wake-up the writer thread gets when a batch opens: it must cut it by `deadline`."""
    __slots__ = ("deadline",)

    def __init__(self, deadline: float):
        self.deadline = deadline


class RecordWriter:
    def __init__(self, agent_id: str, key: Ed25519PrivateKey, state_dir: str, spool: Spool,
                 batch_max_events: int = DEFAULT_BATCH_EVENTS, batch_max_delay: float = 0.5,
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
        self._lock = threading.Lock()              # the open batch and the chain head
        self._open: BatchBuilder | None = None
        self._open_since = 0.0
        self._unstored = 0                         # events in cut batches not yet in the spool
        self._queue: queue.SimpleQueue = queue.SimpleQueue()   # cut batches and markers, in order
        self._held: bytes | None = None            # a batch the full spool refused
        self._alerts: BatchBuilder | None = None   # spool-full alerts queued, not yet stored
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
    def emitter(self, session_id: str | None):
        """emit() bound to one session: `emitter(sid)(event_type, fields)`. Native builds give a C
        callable that seals into the open batch without a Python frame and hands every other
        case (cut, full, closed, an encoding to repair) to emit()."""
        if NATIVE:
            return _native.Emitter(self, session_id)
        return functools.partial(self.emit, session_id=session_id)

    def emit(self, event_type: str, fields: dict, session_id: str | None = None) -> None:
        batch = self._open
        if batch is not None and NATIVE:
            try:
                if batch.emit(session_id, event_type, fields):
                    return
            except EncodingError as exc:
                self._emit_locked(event_type, fields, session_id, exc)
                return
        self._emit_locked(event_type, fields, session_id)

    def _emit_locked(self, event_type: str, fields: dict, session_id: str | None,
                     unencodable: Exception | None = None) -> None:
        """Seal under the lock: no open batch, the open one is closed or full, or no native
        builder; `unencodable`: the event already failed to encode (repair it).

        Native emits add to the open batch without this lock, so here an event goes into it
        only through the same atomic emit; otherwise into a new batch that no other thread
        sees until the event is in it. A batch never holds more than its limit."""
        if unencodable is None:
            validate_fields(event_type, fields)
        with self._lock:
            if self._closing:
                raise RuntimeError("RecordWriter is closed")
            batch = self._open
            if batch is not None and NATIVE:
                if unencodable is None:
                    try:        # another producer may have opened it since this one looked
                        if batch.emit(session_id, event_type, fields):
                            return
                    except EncodingError as exc:
                        unencodable = exc
                self._cut_locked(close_empty=True)
                batch = None
            elif batch is not None and batch.count >= batch.limit:
                self._cut_locked()
                batch = None
            if self._held is not None:
                backlog = self._unstored + (batch.count if batch is not None else 0)
                if backlog >= self.backlog_cap:
                    raise RecordBacklogFull(
                        f"record backlog reached {self.backlog_cap} events while the spool "
                        f"{self.spool.path} is full; end the session (no evidence, no access)")
            fresh = batch is None
            if fresh:
                batch = BatchBuilder(self.agent_id, self.last_hash, self.last_seq + 1)
                batch.limit = self._batch_limit()
            if unencodable is not None:
                self._seal_repaired(batch, None, session_id, event_type, fields, unencodable)
            else:
                try:
                    batch.add(None, session_id, event_type, fields)
                except (TypeError, ValueError, OverflowError) as exc:
                    self._seal_repaired(batch, None, session_id, event_type, fields, exc)
            if fresh:           # published only now, with its first event in it
                self._open = batch
                self._open_since = time.monotonic()
                self._queue.put(_OpenBatch(self._open_since + self.batch_max_delay))
            if batch.count >= batch.limit:
                self._cut_locked()

    def _batch_limit(self) -> int:
        """Events the next batch may take: fewer while the spool is full, so that the
        backlog stops at its cap."""
        if self._held is None:
            return self.batch_max_events
        return max(1, min(self.batch_max_events, self.backlog_cap - self._unstored))

    def chain_head(self) -> tuple[int, bytes]:
        """(last sequence number, its hash), read together: producers on other threads move both."""
        with self._lock:
            batch = self._open
            return batch.head if batch is not None else (self.last_seq, self.last_hash)

    @property
    def full(self) -> bool:
        return self._held is not None or self.spool.full

    def flush(self, timeout: float = 5.0) -> None:
        """Return once every event emitted before the call is in the spool (fsync'd)."""
        marker = _Flush()
        with self._lock:
            self._cut_locked()
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
            with self._lock:
                # an event another thread sealed after the flush still goes to the spool
                self._closing = True
                self._cut_locked(close_empty=True)
            self._queue.put(None)
            self._thread.join(timeout)
            if self._held is None:
                self._save_chain_head()

    # -- sealing (under the lock) -----------------------------------------------------------
    def _seal(self, batch: BatchBuilder, ts: int, sid, event_type: str, fields: dict) -> None:
        try:
            batch.add(ts, sid, event_type, fields)
        except (TypeError, ValueError, OverflowError) as exc:
            self._seal_repaired(batch, ts, sid, event_type, fields, exc)

    def _seal_repaired(self, batch: BatchBuilder, ts: int | None, sid, event_type: str, fields: dict,
                       exc: Exception) -> None:
        # A producer handed us a value msgpack cannot encode. Losing the event (or, worse,
        # every event after it) is not an option: record it with such values in their
        # text form, and say so in the chain.
        safe = _encodable(fields)
        safe["x_encoding_repaired"] = True
        batch.add(ts, sid, event_type, safe)
        batch.add(None, sid, "agent.alert", {
            "kind": "unencodable_event", "severity": "error",
            "message": f"{event_type} carried a value that could not be encoded ({exc}); "
                       f"it was recorded in text form"})

    def _cut_locked(self, close_empty: bool = False) -> None:
        """Close the open batch and queue it for the spool; an empty one stays open unless
        `close_empty`."""
        batch = self._open
        if batch is None or not (batch.count or close_empty):
            return
        batch.close()        # first: from here on no producer can add to it
        self._open = None
        if batch.count:
            self.last_seq, self.last_hash = batch.head
            self._unstored += batch.count
            self._queue.put(batch)

    # -- background thread ---------------------------------------------------------------
    def _run(self) -> None:
        deadline = None
        # flushes that must also wait for the spool-full alerts, which are queued behind them
        waiting: list[_Flush] = []
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = False
            if item is None:
                return
            if isinstance(item, BatchBuilder):
                self._store_batch(item)
                if item is self._alerts:      # stored without the spool filling up again
                    self._alerts = None
                    for marker in waiting:
                        marker.done.set()
                    waiting = []
            elif isinstance(item, _Flush):
                if self._alerts is not None:
                    waiting.append(item)
                else:
                    item.done.set()
            elif isinstance(item, _OpenBatch):
                deadline = item.deadline if deadline is None else min(deadline, item.deadline)
            if deadline is not None and time.monotonic() >= deadline:
                deadline = None
                with self._lock:
                    if self._open is not None:
                        if time.monotonic() - self._open_since >= self.batch_max_delay:
                            self._cut_locked()
                        else:   # opened after the one that set this deadline
                            deadline = self._open_since + self.batch_max_delay

    def _store_batch(self, batch: BatchBuilder) -> None:
        """Store one cut batch; if the spool was full meanwhile, queue the alerts saying so."""
        full_since = self._store(batch)
        with self._lock:
            self._unstored -= batch.count
            if full_since:
                # The full spool delayed these events; say so in the chain itself, before
                # any waiting flush() returns (its marker is behind this alert batch).
                self._cut_locked()
                alerts = BatchBuilder(self.agent_id, self.last_hash, self.last_seq + 1)
                self._seal(alerts, full_since[0], None, "agent.alert", {
                    "kind": "spool_full", "severity": "critical", "message": full_since[1]})
                self._seal(alerts, None, None, "agent.alert", {
                    "kind": "spool_space_restored", "severity": "warning",
                    "message": "the record spool has space again; events "
                               "were held in memory meanwhile, none dropped"})
                alerts.close()
                self.last_seq, self.last_hash = alerts.head
                self._unstored += alerts.count
                self._alerts = alerts
                self._queue.put(alerts)

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
                    with self._lock:
                        self._held = data
                        open_batch = self._open
                        if open_batch is not None:
                            # the open batch may only fill up to the backlog cap
                            room = self.backlog_cap - self._unstored
                            if room > open_batch.count:
                                open_batch.limit = min(open_batch.limit or room, room)
                            else:
                                open_batch.close()
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


def _encodable(value, depth: int = 0):
    """The same data with anything msgpack cannot carry turned into plain types or text."""
    if depth >= MAX_DEPTH and isinstance(value, (dict, list, tuple, set, frozenset)):
        return f"<{type(value).__name__} nested deeper than {MAX_DEPTH} levels, not recorded>"
    if isinstance(value, dict):
        return {str(k): _encodable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_encodable(v, depth + 1) for v in value), key=repr)
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes, float)):
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 64) else str(value)
    return str(value)
