"""Durable, append-only spool of frames (encoded batches) awaiting shipment.

Layout: ``<path>/seg-<first frame no, 16 digits>.wal`` segment files and ``<path>/acked``
(the highest frame number the collector acknowledged, replaced atomically). A segment's
name is never above the number of its first frame, and below every frame of the next one.

Frame: ``u32 length | u32 CRC-32 | u64 frame number | payload`` (little endian); the
CRC covers the length, the frame number and the payload, so a zero-filled or torn tail
never passes as a frame. Frame numbers only grow along the spool (gaps are allowed).

Durability guarantee: when ``append`` returns, the frame and every frame appended
before it are on stable storage (file data fsync'd, new segment files' directory
entries fsync'd). Concurrent appends share fsyncs (group commit): a thread whose frame
was already covered by another thread's fsync returns without its own.

Failures: ``append`` raises OSError when a write or an fsync fails (EIO, ENOSPC); a
frame it raised for is not in the spool, now or after a restart. A short write is
continued until the whole frame is written; when a write fails part-way, the segment is
truncated back to its last whole frame. When an fsync fails, the kernel may have dropped
the pages it could not write while reporting them clean, so every frame written since the
last successful fsync is cut off again (truncated, and the truncation fsync'd) and each of
their appends raises; the caller appends it again. A truncation that fails itself is
retried before the next write, which raises until it succeeds.

Recovery at open: each segment is scanned. An invalid frame (torn write, CRC mismatch,
implausible length or frame number) is skipped when a valid frame follows it in the same
segment (found by its frame number and CRC), so one damaged frame costs only that frame;
invalid bytes after the last valid frame of a segment are cut off. Both are described in
``recovery_notes`` (the agent records them as an ``agent.alert`` ``spool_recovered``), and
``recovery_lost_frames`` counts frame numbers lost that the collector had not acknowledged.
The segment holding the newest durable frame is never deleted, so the newest frame (and
with it the writer's chain head) survives even when all is acked.

Full: ``on_full`` says what ``append`` does when the frame would take the spool past
``max_bytes``: ``refuse`` raises SpoolFull at once; ``block`` waits up to
``block_timeout`` seconds (None: until space or close) for acknowledgements to free
space, then raises SpoolFull. ``append(wait=False)`` never waits and ``append(force=True)``
ignores ``max_bytes`` (the record writer uses both: it holds batches itself, and stores what
it holds past the limit when the agent stops rather than lose it).
"""

from __future__ import annotations

import errno
import os
import re
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
# recovery, in the newest segment (no next segment bounds its frame numbers): how far past
# the last valid frame number a frame found after damage may be numbered
_RESYNC_WINDOW = 1 << 20
_NO_UPPER = (1 << 64) - 1
_NONZERO = re.compile(rb"[^\x00]")


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


def _frame_problem(data, offset: int, after: int, upper: int) -> str | None:
    """Why the bytes at `offset` are not a valid frame numbered after..upper (None: they are)."""
    if len(data) - offset < _HEADER.size:
        return "torn frame header"
    length, crc, frame_no = _HEADER.unpack_from(data, offset)
    start = offset + _HEADER.size
    if length == 0 or length > MAX_FRAME_BYTES:
        return f"implausible frame length {length}"
    if not after < frame_no <= upper:
        return f"frame number {frame_no} out of order (after {after})"
    if start + length > len(data):
        return "torn frame payload"
    if _frame_crc(length, frame_no, memoryview(data)[start:start + length]) != crc:
        return "CRC mismatch"
    return None


def _resync(data, bad: int, after: int, upper: int) -> int | None:
    """Offset of the first valid frame past the invalid one at `bad`, numbered after..upper."""
    if len(data) - bad >= _HEADER.size:
        # usually only the payload is damaged: the header still says where the next frame is
        length = _HEADER.unpack_from(data, bad)[0]
        follower = bad + _HEADER.size + length
        if 0 < length <= MAX_FRAME_BYTES and follower < len(data) \
                and _frame_problem(data, follower, after, upper) is None:
            return follower
    # Search by frame number: numbers sharing their high six bytes (blocks of 65536, in
    # increasing order: frames further on carry higher numbers) are found with one scan each.
    block = (after + 1) >> 16
    while block << 16 <= upper:
        pattern = (block << 16).to_bytes(8, "little")[2:]
        found = data.find(pattern, bad + 11)          # the number sits 8..16 bytes into a frame
        while found != -1:
            start = found - 10
            if _frame_problem(data, start, after, upper) is None:
                return start
            if not any(pattern) and not any(data[found - 10:found]):
                # inside a run of zeros no frame can start: jump past the run
                run_end = _NONZERO.search(data, found)
                if run_end is None:
                    break
                found = data.find(pattern, run_end.start())
            else:
                found = data.find(pattern, found + 1)
        block += 1
    return None


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
        self.recovery_lost_frames = 0          # unacknowledged frame numbers recovery lost
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
        if self._segments:
            # an emptied newest segment takes the next frame: its name stays its first frame's
            self._next_frame = max(self._next_frame, max(self._segments))
        del self._all_refs
        self._current = max(self._segments) if self._segments else None
        self._fd = None
        if self._current is not None:
            self._fd = os.open(self._segment_path(self._current), os.O_WRONLY | os.O_APPEND)
        self._retired: list[int] = []
        self._unsynced: list[tuple[int, SpoolRef]] = []
        self._written = 0          # frames written so far (a position, not bytes)
        self._synced = 0           # frames known durable
        self._failed: dict[int, OSError] = {}   # position -> why that append must raise
        self._repair: dict[int, int] = {}       # segment -> size it must be truncated back to

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
        last_frame = 0
        for position, name in enumerate(names):
            newest = position == len(names) - 1
            path = self._segment_path(name)
            with open(path, "rb") as handle:
                data = handle.read()
            offset, valid_end = 0, 0
            # a segment's frames are numbered from its name on, below the next segment's name
            upper = _NO_UPPER if newest else names[position + 1] - 1
            while offset < len(data):
                reason = _frame_problem(data, offset, last_frame, upper)
                if reason is None:
                    length, _, frame_no = _HEADER.unpack_from(data, offset)
                    ref = SpoolRef(frame_no, name, offset, length)
                    self._all_refs.append(ref)
                    if frame_no > self._acked:
                        self._index.append(ref)
                    last_frame = frame_no
                    offset = offset + _HEADER.size + length
                    valid_end = offset
                    continue
                follower = _resync(data, offset, last_frame, upper if not newest else
                                   max(last_frame, name) + _RESYNC_WINDOW)
                if follower is None:
                    self.recovery_notes.append(
                        f"{os.path.basename(path)}: {reason} at offset {offset}; cut "
                        f"{len(data) - offset} bytes, kept {offset}")
                    break
                next_frame = _HEADER.unpack_from(data, follower)[2]
                missing = (last_frame + 1, next_frame - 1)
                unacked = max(0, missing[1] - max(missing[0] - 1, self._acked))
                self.recovery_lost_frames += unacked
                if missing[0] > missing[1]:
                    what = "no frame number is missing"
                else:
                    what = (f"frame numbers {missing[0]}..{missing[1]} are missing"
                            + (f", {unacked} of them not yet acknowledged by the collector: "
                               f"their records are lost" if unacked else
                               ", all already acknowledged by the collector"))
                self.recovery_notes.append(
                    f"{os.path.basename(path)}: {reason} at offset {offset}; skipped "
                    f"{follower - offset} bytes to the next valid frame (number {next_frame}) at "
                    f"offset {follower}; {what}")
                offset = follower
            if valid_end < len(data):
                with open(path, "r+b") as handle:
                    handle.truncate(valid_end)
                    os.fsync(handle.fileno())
            if valid_end == 0 and not newest:
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

    def append(self, data: bytes, *, wait: bool | None = None, force: bool = False) -> SpoolRef:
        """Store one frame durably. `wait`: whether to wait for space (None: as on_full says);
        `force`: ignore max_bytes. Raises SpoolFull, SpoolClosed, ValueError (size) or OSError
        (nothing of this frame stays in the spool)."""
        length = len(data)
        if not 0 < length <= MAX_FRAME_BYTES:
            raise ValueError(f"frame of {length} bytes: must be 1..{MAX_FRAME_BYTES}")
        size = _HEADER.size + length
        with self._lock:
            if self._closed:
                raise SpoolClosed("spool is closed")
            self._repair_locked()
            if not force:
                self._wait_for_space(size, self.on_full == "block" if wait is None else wait)
            frame_no = self._next_frame
            if self._current is None or (self._segments[self._current] > 0 and
                                         self._segments[self._current] + size > self.segment_bytes):
                self._rotate(frame_no)
            offset = self._segments[self._current]
            header = _HEADER.pack(length, _frame_crc(length, frame_no, data), frame_no)
            self._write_all(offset, header + data)
            self._next_frame += 1
            self._segments[self._current] = offset + size
            ref = SpoolRef(frame_no, self._current, offset, length)
            self._written += 1
            position = self._written
            self._unsynced.append((position, ref))
        self._sync_upto(position)
        return ref

    def _write_all(self, offset: int, frame: bytes) -> None:
        """Write the whole frame at the end of the current segment: write(2) may store only part
        of it (a disk filling up); on an error part-way, cut the segment back to `offset`."""
        view = memoryview(frame)
        done = 0
        try:
            while done < len(view):
                written = os.write(self._fd, view[done:])
                if written <= 0:
                    raise OSError(errno.ENOSPC, "write(2) stored nothing of the rest of the frame")
                done += written
        except OSError:
            if done:
                self._truncate_locked(self._current, offset)
            raise

    def _truncate_locked(self, segment: int, size: int) -> None:
        """Cut `segment` back to `size` bytes, durably; if that fails, before the next write."""
        self._segments[segment] = size
        self._repair[segment] = min(size, self._repair.get(segment, size))
        try:
            self._repair_locked()
        except OSError:
            pass        # retried (and raised) by the next append

    def _repair_locked(self) -> None:
        for segment, size in sorted(self._repair.items()):
            if segment == self._current and self._fd is not None:
                os.ftruncate(self._fd, size)
                os.fsync(self._fd)
            else:
                with open(self._segment_path(segment), "r+b") as handle:
                    handle.truncate(size)
                    os.fsync(handle.fileno())
            del self._repair[segment]

    def _rollback_locked(self, exc: OSError) -> None:
        """An fsync failed: no frame written since the last good one is known to be on disk
        (the kernel may have dropped the pages it failed to write). Cut them all off; each of
        their appends raises."""
        unsynced, self._unsynced = self._unsynced, []
        cut: dict[int, int] = {}
        for position, ref in unsynced:
            self._failed[position] = OSError(exc.errno, f"{exc.strerror or exc} (fsync of spool "
                                                        f"{self.path} failed; frame not stored)")
            cut[ref.segment] = min(cut.get(ref.segment, ref.offset), ref.offset)
        for segment, size in cut.items():
            self._truncate_locked(segment, size)

    def _wait_for_space(self, size: int, wait: bool) -> None:
        if self.used_bytes + size <= self.max_bytes:
            self._refused = False
            return
        if not wait:
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
        if frame_no in self._segments:      # cannot happen: names only grow
            raise RuntimeError(f"spool {self.path}: segment {frame_no} exists already")
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._rollback_locked(exc)
                raise
        # O_TRUNC, not O_EXCL: a file of this name can only be left over from a rotation
        # that failed after creating it (it holds no frame)
        fd = os.open(self._segment_path(frame_no),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fsync_dir(self.path)
        except OSError:
            os.close(fd)
            raise
        if self._fd is not None:
            # Closed by the next syncer: one may be about to fsync this descriptor.
            self._retired.append(self._fd)
        self._fd = fd
        self._current = frame_no
        self._segments[frame_no] = 0

    def _sync_upto(self, position: int) -> None:
        # Group commit: whoever holds the sync lock fsyncs everything written so far;
        # threads whose frame it covered return without an fsync of their own.
        while True:
            with self._lock:
                failed = self._failed.pop(position, None)
                if failed is not None:
                    raise failed
                if self._synced >= position:
                    return
            with self._sync_lock:
                with self._lock:
                    if position in self._failed or self._synced >= position:
                        continue
                    target, fd = self._written, self._fd
                    retired, self._retired = self._retired, []
                try:
                    if fd is not None:
                        os.fsync(fd)
                except OSError as exc:
                    with self._lock:
                        self._retired[:0] = retired
                        self._rollback_locked(exc)
                    continue                # our own position failed with the rest
                for old in retired:
                    os.close(old)
                with self._lock:
                    self._synced = max(self._synced, target)
                    # Frames become visible to pending() only once durable, in order.
                    while self._unsynced and self._unsynced[0][0] <= target:
                        ref = self._unsynced.pop(0)[1]
                        self._index.append(ref)
                        self._last_durable = ref

    # -- reading and acknowledging -------------------------------------------------------
    def pending_refs(self) -> list[SpoolRef]:
        """Durable frames not yet acknowledged, in order (their payloads: read())."""
        with self._lock:
            return [ref for ref in self._index if ref.frame_no not in self._acked_out_of_order]

    def read(self, ref: SpoolRef) -> bytes | None:
        """A frame's payload; None when it was acknowledged and deleted meanwhile."""
        try:
            fd = os.open(self._segment_path(ref.segment), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, ref.length, ref.offset + _HEADER.size)
        finally:
            os.close(fd)

    def pending(self) -> Iterator[tuple[SpoolRef, bytes]]:
        refs = self.pending_refs()
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
        error = None
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._space.notify_all()
            fds, self._retired = self._retired, []
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    self._rollback_locked(exc)      # their appends raise
                    error = exc
                fds.append(self._fd)
                self._fd = None
        with self._sync_lock:
            for fd in fds:
                os.close(fd)
        if error is not None:
            raise error
