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
along, so sequence numbers are never used twice across restarts.

A batch larger than ``batch_max_bytes`` (its events' encoded fields) is stored as several
frames, each a signed batch of consecutive events (the chain does not care where batches
start): the collector refuses batches over 64 MiB. Only a single event larger than that
makes a larger frame.

Storing never kills the writer thread. While the spool refuses a batch (full) or fails
(OSError: EIO, ENOSPC), the batch is held and retried (full: every 0.2 s; I/O error: with
backoff up to 5 s), ``full`` is True (the agent admits no new session) and producers may
only add up to ``backlog_cap`` events in memory, then get RecordBacklogFull. Once storing
works again, ``agent.alert`` events say what happened (``spool_full`` +
``spool_space_restored``, ``spool_io_error`` + ``spool_io_recovered``), with the time it
started. If the thread dies all the same, ``full`` stays True, every emit raises
RecordBacklogFull and ``failure`` says why (the agent stops petting the systemd watchdog).

``close()`` stores what is held past ``spool.max_bytes`` rather than lose it, and always
saves the chain head. Events it still cannot store (I/O error, a frame over the spool's
maximum, the thread not done in time) are named in ``<state_dir>/lost-records``; the next
writer records an ``agent.alert`` ``records_lost`` with each sequence range and deletes the
file once that alert is in the spool. The collector's verify shows the gap itself.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import queue
import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from records.batch import (CURRENT_DICTIONARY, BatchBuilder, BatchFormatError, batch_header, pack_batch_body,
                           compress_body, decode_batch, signing_digest)
from records.codec import GENESIS_HASH, MAX_DEPTH, NATIVE, EncodingError, _native
from records.durable import fsync_dir
from records.schema import SCHEMA_VERSION, validate_fields
from records.spool import Spool, SpoolClosed, SpoolFull

if NATIVE:
    _native.set_validator(validate_fields)

log = logging.getLogger("warden.records")

DEFAULT_BACKLOG_CAP = 2_000_000
DEFAULT_BATCH_EVENTS = 8192
# encoded event fields per frame: well under the collector's 64 MiB (collector/app.py
# MAX_BATCH_BYTES) and the decoder's 256 MiB decompressed limit
DEFAULT_BATCH_BYTES = 16 << 20
_RETRY_FULL_S = 0.2
_RETRY_IO_FIRST_S = 0.05
_RETRY_IO_MAX_S = 5.0
_CLOSE_IO_ATTEMPTS = 3          # at close, an I/O error is retried this often, then the batch is lost
_STATE_FILE = "chain-head"
LOST_FILE = "lost-records"


class RecordBacklogFull(RuntimeError):
    """The spool is full and the in-memory backlog reached its cap: the caller must
    stop producing governed traffic (close the session) rather than lose evidence."""


class _Flush:
    __slots__ = ("done",)

    def __init__(self):
        self.done = threading.Event()


class _Durable:
    """A when_durable() request: every event up to `seq` stored, none lost past `low` (what
    was stored when it was made)."""
    __slots__ = ("seq", "low", "callback")

    def __init__(self, seq: int, low: int, callback):
        self.seq, self.low, self.callback = seq, low, callback


class RecordsNotDurable(RuntimeError):
    """when_durable(): the events it waited for cannot be stored."""


class _OpenBatch:
    """The wake-up the writer thread gets when a batch opens: it must cut it by `deadline`."""
    __slots__ = ("deadline",)

    def __init__(self, deadline: float):
        self.deadline = deadline


class RecordWriter:
    def __init__(self, agent_id: str, key: Ed25519PrivateKey, state_dir: str, spool: Spool,
                 batch_max_events: int = DEFAULT_BATCH_EVENTS, batch_max_delay: float = 0.5,
                 backlog_cap: int = DEFAULT_BACKLOG_CAP, dictionary=CURRENT_DICTIONARY,
                 batch_max_bytes: int = DEFAULT_BATCH_BYTES):
        self.agent_id = agent_id
        self.dictionary = dictionary     # zstd dictionary for new batches (None: none)
        self.key = key
        self.state_dir = state_dir
        self.spool = spool
        self.batch_max_events = batch_max_events
        self.batch_max_delay = batch_max_delay
        self.backlog_cap = backlog_cap
        self.batch_max_bytes = batch_max_bytes
        self.recovery_notes: list[str] = []        # what starting up had to work around
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.last_seq, self.last_hash = self._recover_chain_head()
        self._stored_through = self.last_seq       # every seq up to here is stored (or reported lost)
        self._lock = threading.Lock()              # the open batch and the chain head
        self._open: BatchBuilder | None = None
        self._open_since = 0.0
        self._unstored = 0                         # events in cut batches not yet in the spool
        self._queue: queue.SimpleQueue = queue.SimpleQueue()   # cut batches and markers, in order
        self._held: str | None = None              # why the spool does not take batches now
        self._stalls: dict[str, dict] = {}         # "full"/"io" -> since, errors, failures
        self._pending_alerts: list[tuple] = []     # (ts, fields, lost entry) to seal after a batch
        self._alerts: BatchBuilder | None = None   # alerts queued, not yet stored
        self._alert_entries: dict[int, list] = {}  # id(alert batch) -> lost entries it records
        self._lost: list[dict] = []                # seq ranges never stored nor yet recorded so
        self._lost_file_batch: BatchBuilder | None = None
        self._failure: BaseException | None = None
        self._wake = threading.Event()             # close() ends a retry wait
        self._closing = False
        self._record_previous_losses()
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
            else:
                self.recovery_notes.append(f"{_STATE_FILE} file has {len(data)} bytes, not 40: ignored")
        except FileNotFoundError:
            pass
        frame = self.spool.last_frame()
        if frame is not None:
            try:
                batch = decode_batch(frame)
            except BatchFormatError as exc:
                log.error("newest spool frame is unreadable (%s); continuing the chain "
                          "from the state file", exc)
                self.recovery_notes.append(f"newest spool frame is unreadable ({exc}); the chain "
                                           f"continues from the {_STATE_FILE} file at seq {best[0]}")
            else:
                if batch.last_seq > best[0]:
                    best = (batch.last_seq, batch.last_hash)
        return best

    def _save_chain_head(self) -> None:
        with self._lock:
            head = self.last_seq.to_bytes(8, "little") + self.last_hash
        _write_atomically(self.state_dir, _STATE_FILE, head)

    # -- records lost at an earlier stop -------------------------------------------------
    def _record_previous_losses(self) -> None:
        """Seal an agent.alert records_lost for each range in the lost-records file as the
        first batch; the file is deleted once that batch is in the spool."""
        path = os.path.join(self.state_dir, LOST_FILE)
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return
        try:
            entries = json.loads(raw)
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ValueError("not a list of ranges")
        except ValueError as exc:
            entries = [{"reason": f"the {LOST_FILE} file of an earlier run is unreadable ({exc}); "
                                  f"events of that run were not stored"}]
        if not entries:
            return
        batch = BatchBuilder(self.agent_id, self.last_hash, self.last_seq + 1)
        for entry in entries[:1000]:
            self._seal(batch, None, None, "agent.alert", _lost_alert(entry))
        batch.close()
        self.last_seq, self.last_hash = batch.head
        self._unstored += batch.count
        self._lost_file_batch = batch
        self._queue.put(batch)

    def _save_lost(self) -> None:
        """Add the ranges lost in this run (and not recorded in the chain) to the lost-records
        file, which the next writer records."""
        with self._lock:
            entries = list(self._lost)
        if not entries:
            return
        path = os.path.join(self.state_dir, LOST_FILE)
        try:
            with open(path, "rb") as handle:
                earlier = json.loads(handle.read())
            if isinstance(earlier, list):
                entries = [e for e in earlier if isinstance(e, dict)] + entries
        except (OSError, ValueError):
            pass
        _write_atomically(self.state_dir, LOST_FILE, json.dumps(entries).encode())

    def _lose(self, first: int, last: int, reason: str) -> None:
        entry = {"first_seq": first, "last_seq": last, "events": last - first + 1,
                 "reason": reason, "at_ns": time.time_ns()}
        log.critical("records seq %d..%d were sealed but never stored: %s", first, last, reason)
        with self._lock:
            self._lost.append(entry)
            if not self._closing:
                self._pending_alerts.append((None, _lost_alert(entry), entry))

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
            if self._failure is not None:
                raise RecordBacklogFull(f"{self._held}: no event can be stored; end the session "
                                        f"(no evidence, no access)")
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
                        f"record backlog reached {self.backlog_cap} events while records cannot be "
                        f"stored ({self._held}); end the session (no evidence, no access)")
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
            return self._head_locked()

    def _head_locked(self) -> tuple[int, bytes]:
        batch = self._open
        return batch.head if batch is not None else (self.last_seq, self.last_hash)

    @property
    def full(self) -> bool:
        """True while records cannot be stored (spool full, spool I/O error, writer failed): the
        agent admits no new session."""
        return self._held is not None or self.spool.full

    @property
    def problem(self) -> str | None:
        """Why records are not being stored right now (None: they are)."""
        return self._held

    @property
    def failure(self) -> str | None:
        """Set when the writer thread is gone: nothing will be stored until a restart."""
        if self._failure is not None:
            return self._held
        if not self._closing and not self._thread.is_alive():
            return "the record writer thread is not running"
        return None

    def flush(self, timeout: float = 5.0) -> None:
        """Return once every event emitted before the call is in the spool (fsync'd)."""
        if self._failure is not None:
            raise TimeoutError(f"records cannot be made durable: {self._held}")
        marker = _Flush()
        with self._lock:
            self._cut_locked()
            self._queue.put(marker)
        if not marker.done.wait(timeout):
            raise TimeoutError(f"records not durable within {timeout} s"
                               + (f" ({self._held})" if self._held else ""))

    def when_durable(self, callback) -> None:
        """callback(None) once every event emitted before this call is in the spool (fsync'd);
        callback(RecordsNotDurable) if one of them cannot be stored (the writer failed or is
        closing, or they were lost). Called at once on this thread when nothing is pending,
        else on the writer thread: it must not block. The open batch is cut when the writer
        takes the request, not when it is made, so requests made while the writer stores a
        batch share the next one and its fsync (group commit)."""
        error = None
        with self._lock:
            seq = self._head_locked()[0]
            if self._failure is not None or self._closing:
                error = RecordsNotDurable(self._held if self._failure is not None
                                          else "the record writer is closing")
            elif seq > self._stored_through:
                self._queue.put(_Durable(seq, self._stored_through, callback))
                return
        callback(error)

    def _durable_request(self, request: _Durable, closing: bool) -> None:
        """On the writer thread: answer a when_durable() request, or cut the batch its events
        are in and queue it again behind that batch."""
        with self._lock:
            lost = next((e for e in self._lost if "first_seq" in e and e["first_seq"] <= request.seq
                         and e["last_seq"] > request.low), None)
            if lost is not None:
                error = RecordsNotDurable(f"records {lost['first_seq']}..{lost['last_seq']} "
                                          f"were not stored: {lost['reason']}")
            elif request.seq <= self._stored_through:
                error = None
            elif closing:
                error = RecordsNotDurable("the record writer stopped before storing them")
            else:
                if request.seq > self.last_seq:      # still in the open batch
                    self._cut_locked()
                self._queue.put(request)
                return
        try:
            request.callback(error)
        except Exception:        # the waiter's bug must not end the writer
            log.exception("a when_durable callback failed")

    def close(self, timeout: float = 10.0) -> None:
        """Store everything sealed so far (past spool.max_bytes if the spool is full), then
        save the chain head; raises TimeoutError if the thread did not finish in time (what it
        had not stored is then named in the lost-records file)."""
        if self._closing:
            return
        with self._lock:
            # from here on producers are refused and the thread stores what it holds even
            # past a full spool; an event sealed meanwhile into the open batch goes with it
            self._closing = True
            self._cut_locked(close_empty=True)
        self._queue.put(None)
        self._wake.set()
        self._thread.join(timeout)
        finished = not self._thread.is_alive() and self._failure is None
        with self._lock:
            done = max([self._stored_through] + [entry["last_seq"] for entry in self._lost
                                                 if "last_seq" in entry])
            if not finished and self.last_seq > done:
                why = (self._held if self._failure is not None else
                       f"the writer had not stored them {timeout} s after the agent began to stop")
                entry = {"first_seq": done + 1, "last_seq": self.last_seq,
                         "events": self.last_seq - done, "reason": why, "at_ns": time.time_ns()}
                self._lost.append(entry)
                log.critical("records seq %d..%d were not stored before the writer stopped: %s",
                             done + 1, self.last_seq, why)
        # Always: the next run must continue after every sequence number handed out, so that
        # anything not stored shows as a gap instead of being numbered again.
        try:
            self._save_chain_head()
        except OSError as exc:
            log.critical("could not save the record chain head in %s: %s", self.state_dir, exc)
        try:
            self._save_lost()
        except OSError as exc:
            log.critical("could not save the list of lost records in %s: %s", self.state_dir, exc)
        if not finished:
            raise TimeoutError(f"records not all stored within {timeout} s"
                               + (f" ({self._held})" if self._held else ""))

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
        try:
            self._loop()
        except BaseException as exc:       # never silently: the agent must stop taking sessions
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        log.critical("the record writer thread failed: %r; no record is stored from now on, new "
                     "sessions are refused and the agent stops petting the systemd watchdog",
                     exc, exc_info=exc)
        with self._lock:
            self._held = f"the record writer thread failed ({type(exc).__name__}: {exc})"
            self._failure = exc
            if self._open is not None:
                self._open.close()       # producers take the locked path, which refuses

    def _loop(self) -> None:
        deadline = None
        # flushes that must also wait for the alerts, which are queued behind them
        waiting: list[_Flush] = []
        closing = False
        while True:
            if closing:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    for marker in waiting:
                        marker.done.set()
                    return
            else:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = False
            if item is None:
                # close(): what is still queued behind the marker is only what this thread
                # queued itself (alerts): store it too, then stop
                closing = True
                continue
            if isinstance(item, BatchBuilder):
                self._store_batch(item)
                if item is self._alerts:      # stored without the spool failing again
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
            elif isinstance(item, _Durable):
                self._durable_request(item, closing)
            if deadline is not None and time.monotonic() >= deadline:
                deadline = None
                with self._lock:
                    if self._open is not None:
                        if time.monotonic() - self._open_since >= self.batch_max_delay:
                            self._cut_locked()
                        else:   # opened after the one that set this deadline
                            deadline = self._open_since + self.batch_max_delay

    def _store_batch(self, batch: BatchBuilder) -> None:
        """Store one cut batch; then queue the alerts about what storing ran into."""
        stored = self._store(batch)
        with self._lock:
            self._unstored -= batch.count
            recorded = self._alert_entries.pop(id(batch), ())
            if stored:
                for entry in recorded:      # its alerts are in the chain now
                    if entry in self._lost:
                        self._lost.remove(entry)
            alerts, self._pending_alerts = self._pending_alerts, []
            if alerts:
                # Say what happened in the chain itself, before any waiting flush() returns
                # (its marker is behind this alert batch).
                self._cut_locked()
                batch_alerts = BatchBuilder(self.agent_id, self.last_hash, self.last_seq + 1)
                for ts, fields, _ in alerts:
                    self._seal(batch_alerts, ts, None, "agent.alert", fields)
                batch_alerts.close()
                self.last_seq, self.last_hash = batch_alerts.head
                self._unstored += batch_alerts.count
                self._alert_entries[id(batch_alerts)] = [e for _, _, e in alerts if e is not None]
                self._alerts = batch_alerts
                self._queue.put(batch_alerts)
        if stored and batch is self._lost_file_batch:
            self._lost_file_batch = None
            try:
                os.unlink(os.path.join(self.state_dir, LOST_FILE))
                fsync_dir(self.state_dir)
            except FileNotFoundError:
                pass
            except OSError as exc:      # recorded once more at the next start: better than never
                log.error("could not delete %s: %s", LOST_FILE, exc)

    def _store(self, batch: BatchBuilder) -> bool:
        """Append one batch (as several frames if it is large), retrying while the spool is full
        or failing; False if any of it could not be stored (then recorded as lost)."""
        stored = True
        try:
            pieces = self._pieces(batch)
        except Exception as exc:        # a bug, not a disk problem: lose this batch, not the writer
            log.exception("batch %d..%d could not be encoded", batch.first_seq, batch.last_seq)
            self._lose(batch.first_seq, batch.last_seq, f"their batch could not be encoded ({exc!r})")
            return False
        for start, end in pieces:
            first, last = batch.first_seq + start, batch.first_seq + end - 1
            try:
                data = self._encode(batch, start, end)
            except Exception as exc:
                log.exception("batch %d..%d could not be encoded", first, last)
                self._lose(first, last, f"their batch could not be encoded ({exc!r})")
                stored = False
                continue
            stored = self._append(data, first, last) and stored
        return stored

    def _pieces(self, batch: BatchBuilder) -> list[tuple[int, int]]:
        """Event index ranges of the frames a batch is stored as: each at most batch_max_bytes of
        encoded fields, unless it is a single event."""
        if batch.count == 1:
            return [(0, 1)]
        fields = batch.columns()[5]
        total = sum(map(len, fields))
        if total <= self.batch_max_bytes:
            return [(0, len(fields))]
        pieces, start, size = [], 0, 0
        for index, encoded in enumerate(fields):
            grown = size + len(encoded)
            if index > start and grown > self.batch_max_bytes:
                pieces.append((start, index))
                start, grown = index, len(encoded)
            size = grown
        pieces.append((start, len(fields)))
        return pieces

    def _encode(self, batch: BatchBuilder, start: int, end: int) -> bytes:
        """The signed wire form of events start..end-1 of a cut batch: the whole batch, or a
        part of it as a batch of its own (same events, hashes and chain links)."""
        if start == 0 and end == batch.count:
            return batch.finish(self.key, dictionary=self.dictionary)
        ts_deltas, sids, sid_index, types, type_index, fields, tags, hashes = batch.columns()
        first, last = batch.first_seq + start, batch.first_seq + end - 1
        prev_hash = batch.prev_hash if start == 0 else hashes[start - 1]
        sid_map: dict = {}
        type_map: dict = {}
        sid_column = [sid_map.setdefault(sids[at], len(sid_map)) for at in sid_index[start:end]]
        type_column = [type_map.setdefault(types[at], len(type_map)) for at in type_index[start:end]]
        # timestamps are stored as deltas from the previous event, the first from 0
        ts_column = [sum(ts_deltas[:start + 1])] + list(ts_deltas[start + 1:end])
        own = list(hashes[start:end])
        created_ns = time.time_ns()
        digest = signing_digest(self.agent_id, first, last, prev_hash, own[-1], created_ns,
                                SCHEMA_VERSION, own)
        header = batch_header(self.agent_id, first, last, prev_hash, own[-1], created_ns,
                              self.key.sign(digest), SCHEMA_VERSION, SCHEMA_VERSION,
                              [0] + [1] * (end - start - 1), ts_column, list(sid_map), sid_column,
                              list(type_map), type_column, tags[start * 8:end * 8])
        return compress_body(pack_batch_body(header, fields[start:end]), self.dictionary)

    def _append(self, data: bytes, first: int, last: int) -> bool:
        """Append one frame, holding it while the spool refuses it (full) or fails (I/O error);
        False if it cannot be stored at all."""
        io_delay = _RETRY_IO_FIRST_S
        failures_closing = 0
        while True:
            try:
                self.spool.append(data, wait=False, force=self._closing)
            except SpoolFull as exc:
                self._stall("full", exc)
                pause = _RETRY_FULL_S
            except SpoolClosed:
                self._lose(first, last, "the spool was closed before they were stored")
                return False
            except ValueError as exc:      # over the spool's frame maximum: never storable
                self._lose(first, last, f"their frame cannot be stored ({exc})")
                return False
            except OSError as exc:
                self._stall("io", exc)
                if self._closing:
                    failures_closing += 1
                    if failures_closing >= _CLOSE_IO_ATTEMPTS:
                        self._lose(first, last, f"the spool failed while the agent stopped "
                                                f"({_describe(exc)})")
                        return False
                pause = io_delay
                io_delay = min(io_delay * 2, _RETRY_IO_MAX_S)
            else:
                with self._lock:
                    self._stored_through = max(self._stored_through, last)
                self._resume()
                return True
            if self._closing:
                time.sleep(min(pause, 0.1))
            else:
                self._wake.wait(pause)     # close() ends the wait: what is held is then forced

    def _stall(self, kind: str, exc: Exception) -> None:
        """The spool refused (kind "full") or failed ("io"): hold the batch; from now on the
        writer is full and the backlog is capped."""
        message = str(exc) if kind == "full" else _describe(exc)
        with self._lock:
            stall = self._stalls.get(kind)
            first = stall is None
            if first:
                stall = self._stalls[kind] = {"since": time.time_ns(), "first": message,
                                              "errno": getattr(exc, "errno", None), "failures": 0}
            stall["failures"] += 1
            stall["last"] = message
            if self._held is None:
                open_batch = self._open
                if open_batch is not None:
                    # the open batch may only fill up to the backlog cap
                    room = self.backlog_cap - self._unstored
                    if room > open_batch.count:
                        open_batch.limit = min(open_batch.limit or room, room)
                    else:
                        open_batch.close()
            self._held = (message if kind == "full" else
                          f"storing records in spool {self.spool.path} failed: {message}")
        if first:
            if kind == "full":
                log.error("%s", message)
            else:
                log.critical("storing records in spool %s failed: %s; events are held in memory "
                             "and storing is retried, new sessions are refused meanwhile",
                             self.spool.path, message)

    def _resume(self) -> None:
        """A frame was stored: if storing had stalled, queue the alerts saying so."""
        with self._lock:
            if not self._stalls:
                self._held = None
                return
            stalls, self._stalls = self._stalls, {}
            self._held = None
            closing = self._closing
            for kind in ("io", "full"):
                stall = stalls.get(kind)
                if stall is None:
                    continue
                since, failures = stall["since"], stall["failures"]
                seconds = round((time.time_ns() - since) / 1e9, 3)
                if kind == "full":
                    detail = {"since_ns": since, "refusals": failures, "seconds": seconds}
                    message = stall["first"]
                    if closing:
                        detail["stored_past_max_bytes_at_stop"] = True
                        message += ("; the agent stopped meanwhile and stored the events it held "
                                    "past spool.max_bytes")
                    self._pending_alerts.append((since, {
                        "kind": "spool_full", "severity": "critical", "message": message,
                        "detail": detail}, None))
                    if not closing:
                        self._pending_alerts.append((None, {
                            "kind": "spool_space_restored", "severity": "warning",
                            "message": "the record spool has space again; events "
                                       "were held in memory meanwhile, none dropped"}, None))
                else:
                    self._pending_alerts.append((since, {
                        "kind": "spool_io_error", "severity": "critical",
                        "message": f"storing records in spool {self.spool.path} failed: "
                                   f"{stall['first']}; events were held in memory and storing "
                                   f"was retried, new sessions were refused meanwhile",
                        "detail": {"error": stall["first"], "errno": stall["errno"],
                                   "last_error": stall["last"], "failures": failures,
                                   "since_ns": since, "seconds": seconds}}, None))
                    self._pending_alerts.append((None, {
                        "kind": "spool_io_recovered", "severity": "warning",
                        "message": f"the record spool takes writes again after {failures} failed "
                                   f"attempt(s) over {seconds} s; events were held in memory "
                                   f"meanwhile, none dropped"}, None))
        log.warning("spool %s stores records again", self.spool.path)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{name}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _lost_alert(entry: dict) -> dict:
    first, last = entry.get("first_seq"), entry.get("last_seq")
    span = f"events seq {first}..{last} ({entry.get('events')})" if first is not None else "events"
    return {"kind": "records_lost", "severity": "critical",
            "message": f"{span} were sealed into the chain but never stored: {entry.get('reason')}; "
                       f"the collector's verify shows them as a gap",
            "detail": entry}


def _write_atomically(directory: str, name: str, body: bytes) -> None:
    temp = os.path.join(directory, f"{name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view, done = memoryview(body), 0
        while done < len(view):
            written = os.write(fd, view[done:])
            if written <= 0:
                raise OSError(errno.ENOSPC, f"{name}: write(2) stored nothing")
            done += written
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, os.path.join(directory, name))
    fsync_dir(directory)


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
