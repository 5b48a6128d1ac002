"""Durable, append-only spool of frames (encoded batches) awaiting shipment.

Layout: ``<path>/seg-<first frame no, 16 digits>.wal`` segment files and ``<path>/acked``
(the highest frame number the collector acknowledged, replaced atomically).

Frame: ``u32 length | u32 CRC-32 | u64 frame number | payload`` (little endian); the
CRC covers the length, the frame number and the payload, so a zero-filled or torn tail
never passes as a frame.

Durability guarantee: when ``append`` returns, the frame and every frame appended
before it are on stable storage (file data fsync'd, new segment files' directory
entries fsync'd). Concurrent appends share fsyncs (group commit): a thread whose frame
was already covered by another thread's fsync returns without its own. At open, each
segment is scanned; the first invalid frame (torn write, CRC mismatch) and everything
after it in that segment are cut off and noted in ``recovery_notes``; every valid frame
before it is kept. The segment holding the newest durable frame is never deleted, so
the newest frame (and with it the writer's chain head) survives even when all is acked.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from records.durable import fsync_dir

_HEADER = struct.Struct("<IIQ")
_CRC_PREFIX = struct.Struct("<IQ")
MAX_FRAME_BYTES = 128 << 20
_ACK_FILE = "acked"


class SpoolFull(RuntimeError):
    """The spool has reached max_bytes."""


class SpoolClosed(RuntimeError):
    pass


@dataclass(frozen=True, order=True)
class SpoolRef:
    frame_no: int
    segment: int      # the segment's first frame number (its name)
    offset: int
    length: int       # payload length


def _frame_crc(length: int, frame_no: int, payload) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_PREFIX.pack(length, frame_no)))


class Spool:
    def __init__(self, path: str, max_bytes: int = 1 << 30, on_full: str = "refuse",
                 segment_bytes: int | None = None, block_timeout: float | None = None):
        if on_full not in ("refuse", "block"):
            raise ValueError(f"spool on_full must be 'refuse' or 'block', not {on_full!r}")
        self.path = path
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.segment_bytes = segment_bytes or max(64 << 10, min(64 << 20, max_bytes // 8))
        self.recovery_notes: list[str] = []
        self._lock = threading.Lock()          # file writes and in-memory state
        self._sync_lock = threading.Lock()     # one fsync at a time
        self._space = threading.Condition(self._lock)
        self._closed = False
        self._refused = False
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._segments: dict[int, int] = {}    # segment name -> size in bytes
        self._index: list[SpoolRef] = []        # durable, un-acked frames in order
        self._acked_out_of_order: set[int] = set()
        self._acked = self._read_ack()
        self._last_durable: SpoolRef | None = None
        self._recover()
        self._next_frame = max([self._acked] + [r.frame_no for r in self._all_refs]) + 1
        del self._all_refs
        self._current = max(self._segments) if self._segments else None
        self._fd = None
        if self._current is not None:
            self._fd = os.open(self._segment_path(self._current), os.O_WRONLY | os.O_APPEND)
        self._retired: list[int] = []
        self._unsynced: list[tuple[int, SpoolRef]] = []
        self._written = 0          # frames written so far (a position, not bytes)
        self._synced = 0           # frames known durable

    # -- recovery ----------------------------------------------------------------------
    def _segment_path(self, name: int) -> str:
        return os.path.join(self.path, f"seg-{name:016d}.wal")

    def _read_ack(self) -> int:
        try:
            with open(os.path.join(self.path, _ACK_FILE), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return 0
        if len(data) != 12 or zlib.crc32(data[:8]) != int.from_bytes(data[8:], "little"):
            # A damaged ack marker only means re-sending: the collector deduplicates.
            self.recovery_notes.append("ack marker unreadable: all frames are re-sent")
            return 0
        return int.from_bytes(data[:8], "little")

    def _recover(self) -> None:
        names = sorted(int(entry[4:-4]) for entry in os.listdir(self.path)
                       if entry.startswith("seg-") and entry.endswith(".wal"))
        self._all_refs = []
        for name in names:
            path = self._segment_path(name)
            with open(path, "rb") as handle:
                data = handle.read()
            offset, valid_end = 0, 0
            while offset < len(data):
                reason = None
                if len(data) - offset < _HEADER.size:
                    reason = "torn frame header"
                else:
                    length, crc, frame_no = _HEADER.unpack_from(data, offset)
                    start = offset + _HEADER.size
                    if length == 0 or length > MAX_FRAME_BYTES:
                        reason = f"implausible frame length {length}"
                    elif start + length > len(data):
                        reason = "torn frame payload"
                    elif _frame_crc(length, frame_no, memoryview(data)[start:start + length]) != crc:
                        reason = "CRC mismatch"
                if reason:
                    self.recovery_notes.append(
                        f"{os.path.basename(path)}: {reason} at offset {offset}; cut "
                        f"{len(data) - offset} bytes, kept {offset}")
                    break
                ref = SpoolRef(frame_no, name, offset, length)
                self._all_refs.append(ref)
                if frame_no > self._acked:
                    self._index.append(ref)
                offset = start + length
                valid_end = offset
            if valid_end < len(data):
                with open(path, "r+b") as handle:
                    handle.truncate(valid_end)
                    os.fsync(handle.fileno())
            if valid_end == 0 and name != names[-1]:
                os.unlink(path)
                continue
            self._segments[name] = valid_end
        if self._all_refs:
            self._last_durable = self._all_refs[-1]

    # -- writing -----------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return sum(self._segments.values())

    @property
    def full(self) -> bool:
        return self._refused or self.used_bytes >= self.max_bytes

    @property
    def pending_count(self) -> int:
        return len(self._index)

    @property
    def pending_bytes(self) -> int:
        return sum(ref.length + _HEADER.size for ref in list(self._index))

    def append(self, data: bytes) -> SpoolRef:
        length = len(data)
        if not 0 < length <= MAX_FRAME_BYTES:
            raise ValueError(f"frame of {length} bytes: must be 1..{MAX_FRAME_BYTES}")
        size = _HEADER.size + length
        with self._lock:
            self._wait_for_space(size)
            frame_no = self._next_frame
            if self._current is None or (self._segments[self._current] > 0 and
                                         self._segments[self._current] + size > self.segment_bytes):
                self._rotate(frame_no)
            offset = self._segments[self._current]
            header = _HEADER.pack(length, _frame_crc(length, frame_no, data), frame_no)
            os.write(self._fd, header + data)
            self._next_frame += 1
            self._segments[self._current] = offset + size
            ref = SpoolRef(frame_no, self._current, offset, length)
            self._written += 1
            position = self._written
            self._unsynced.append((position, ref))
        self._sync_upto(position)
        return ref

    def _wait_for_space(self, size: int) -> None:
        if self._closed:
            raise SpoolClosed("spool is closed")
        if self.used_bytes + size <= self.max_bytes:
            self._refused = False
            return
        if self.on_full == "refuse":
            self._refused = True
            raise SpoolFull(f"spool {self.path} is full ({self.used_bytes} of "
                            f"{self.max_bytes} bytes used, collector not acknowledging); "
                            f"new governed sessions are refused until it drains")
        deadline = None if self.block_timeout is None else time.monotonic() + self.block_timeout
        self._refused = True
        while self.used_bytes + size > self.max_bytes:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise SpoolFull(f"spool {self.path} stayed full for {self.block_timeout} s")
            self._space.wait(remaining)
            if self._closed:
                raise SpoolClosed("spool is closed")
        self._refused = False

    def _rotate(self, frame_no: int) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            # Closed by the next syncer: one may be about to fsync this descriptor.
            self._retired.append(self._fd)
        self._fd = os.open(self._segment_path(frame_no),
                           os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fsync_dir(self.path)
        self._current = frame_no
        self._segments[frame_no] = 0

    def _sync_upto(self, position: int) -> None:
        # Group commit: whoever holds the sync lock fsyncs everything written so far;
        # threads whose frame it covered return without an fsync of their own.
        if self._synced >= position:
            return
        with self._sync_lock:
            if self._synced >= position:
                return
            with self._lock:
                target, fd = self._written, self._fd
                retired, self._retired = self._retired, []
            if fd is not None:
                os.fsync(fd)
            for old in retired:
                os.close(old)
            with self._lock:
                self._synced = target
                # Frames become visible to pending() only once durable, in order.
                while self._unsynced and self._unsynced[0][0] <= target:
                    ref = self._unsynced.pop(0)[1]
                    self._index.append(ref)
                    self._last_durable = ref

    # -- reading and acknowledging -------------------------------------------------------
    def pending(self) -> Iterator[tuple[SpoolRef, bytes]]:
        with self._lock:
            refs = [ref for ref in self._index if ref.frame_no not in self._acked_out_of_order]
        handles: dict[int, int] = {}
        try:
            for ref in refs:
                fd = handles.get(ref.segment)
                if fd is None:
                    try:
                        fd = handles[ref.segment] = os.open(self._segment_path(ref.segment),
                                                            os.O_RDONLY)
                    except FileNotFoundError:
                        continue      # acknowledged and deleted meanwhile
                yield ref, os.pread(fd, ref.length, ref.offset + _HEADER.size)
        finally:
            for fd in handles.values():
                os.close(fd)

    def last_frame(self) -> bytes | None:
        """The newest durable frame, acknowledged or not."""
        ref = self._last_durable
        if ref is None:
            return None
        with open(self._segment_path(ref.segment), "rb") as handle:
            return os.pread(handle.fileno(), ref.length, ref.offset + _HEADER.size)

    def ack(self, ref: SpoolRef) -> None:
        with self._lock:
            if ref.frame_no <= self._acked:
                return
            self._acked_out_of_order.add(ref.frame_no)
            advanced = False
            while self._index and self._index[0].frame_no in self._acked_out_of_order:
                done = self._index.pop(0)
                self._acked_out_of_order.discard(done.frame_no)
                self._acked = done.frame_no
                advanced = True
            if not advanced:
                return
            acked = self._acked
        self._write_ack(acked)
        self._delete_shipped_segments()

    def _write_ack(self, acked: int) -> None:
        body = acked.to_bytes(8, "little")
        temp = os.path.join(self.path, f"{_ACK_FILE}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body + zlib.crc32(body).to_bytes(4, "little"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, os.path.join(self.path, _ACK_FILE))
        fsync_dir(self.path)

    def _delete_shipped_segments(self) -> None:
        with self._lock:
            names = sorted(self._segments)
            keep_from = self._last_durable.segment if self._last_durable else None
            doomed = []
            for position, name in enumerate(names):
                next_first = names[position + 1] if position + 1 < len(names) else None
                if name == self._current or name == keep_from or next_first is None:
                    continue
                if next_first - 1 <= self._acked:      # all its frames are acknowledged
                    doomed.append(name)
            for name in doomed:
                del self._segments[name]
            if doomed:
                self._space.notify_all()
                if self.used_bytes < self.max_bytes:
                    self._refused = False
        for name in doomed:
            try:
                os.unlink(self._segment_path(name))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._space.notify_all()
            fds, self._retired = self._retired, []
            if self._fd is not None:
                os.fsync(self._fd)
                fds.append(self._fd)
                self._fd = None
        with self._sync_lock:
            for fd in fds:
                os.close(fd)
