import os
import threading

import pytest

from records.spool import Spool, SpoolFull


def segments(path):
    return sorted(name for name in os.listdir(path) if name.endswith(".wal"))


def payloads(spool):
    return [data for _, data in spool.pending()]


def test_append_pending_and_reopen(tmp_path):
    spool = Spool(str(tmp_path))
    refs = [spool.append(f"frame {n}".encode()) for n in range(5)]
    assert [r.frame_no for r in refs] == [1, 2, 3, 4, 5]
    spool.close()
    again = Spool(str(tmp_path))
    assert payloads(again) == [f"frame {n}".encode() for n in range(5)]
    assert again.recovery_notes == []
    assert again.append(b"next").frame_no == 6


def test_torn_tail_is_truncated_and_earlier_frames_kept(tmp_path):
    spool = Spool(str(tmp_path))
    for n in range(3):
        spool.append(b"x" * 100 + bytes([n]))
    spool.close()
    seg = tmp_path / segments(tmp_path)[-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as handle:
        handle.truncate(size - 30)                 # torn payload of the last frame
    again = Spool(str(tmp_path))
    assert payloads(again) == [b"x" * 100 + bytes([0]), b"x" * 100 + bytes([1])]
    assert "torn frame payload" in again.recovery_notes[0]
    assert seg.stat().st_size == 2 * (size // 3)
    assert again.append(b"after").frame_no == 3    # the torn frame's number is reused
    again.close()
    with open(seg, "ab") as handle:
        handle.write(b"\0" * 7)                    # torn header
    third = Spool(str(tmp_path))
    assert len(payloads(third)) == 3 and "torn frame header" in third.recovery_notes[0]


def test_crc_mismatch_is_detected_and_only_that_frame_is_lost(tmp_path):
    spool = Spool(str(tmp_path))
    for n in range(4):
        spool.append(bytes([n]) * 50)
    spool.close()
    seg = tmp_path / segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    frame = len(data) // 4
    data[2 * frame + 30] ^= 0xFF                   # payload byte of the third frame
    seg.write_bytes(bytes(data))
    again = Spool(str(tmp_path))
    # the fourth frame, intact after the damaged one, is kept (it used to be cut with it)
    assert payloads(again) == [bytes([0]) * 50, bytes([1]) * 50, bytes([3]) * 50]
    assert "CRC mismatch at offset %d" % (2 * frame) in again.recovery_notes[0]
    assert "frame numbers 3..3 are missing" in again.recovery_notes[0]
    assert again.recovery_lost_frames == 1
    assert again.append(b"next").frame_no == 5
    again.close()
    third = Spool(str(tmp_path))
    assert payloads(third)[-2:] == [bytes([3]) * 50, b"next"]


def _spool_of_segments(tmp_path, count=12, size=6000):
    spool = Spool(str(tmp_path), segment_bytes=64 << 10)
    for n in range(count):
        spool.append(bytes([n]) * size)
    spool.close()
    names = segments(tmp_path)
    assert len(names) >= 2
    return names


def _frame_offsets(data):
    offsets, offset = [], 0
    while offset < len(data):
        offsets.append(offset)
        offset += 16 + int.from_bytes(data[offset:offset + 4], "little")
    return offsets


def test_a_bad_frame_in_an_older_segment_costs_only_that_frame(tmp_path):
    """Bug fix: one flipped byte in a segment cut every valid frame after it in that segment,
    unshipped evidence included."""
    names = _spool_of_segments(tmp_path)
    seg = tmp_path / names[0]
    data = bytearray(seg.read_bytes())
    offsets = _frame_offsets(data)
    data[offsets[1] + 100] ^= 0xFF                 # payload of frame 2
    seg.write_bytes(bytes(data))
    again = Spool(str(tmp_path), segment_bytes=64 << 10)
    assert payloads(again) == [bytes([n]) * 6000 for n in range(12) if n != 1]
    assert again.recovery_lost_frames == 1
    assert len(again.recovery_notes) == 1 and "skipped" in again.recovery_notes[0]
    assert "not yet acknowledged" in again.recovery_notes[0]


def test_a_damaged_frame_header_is_resynced_by_frame_number(tmp_path):
    names = _spool_of_segments(tmp_path)
    seg = tmp_path / names[0]
    data = bytearray(seg.read_bytes())
    offsets = _frame_offsets(data)
    data[offsets[2]:offsets[2] + 4] = b"\xf0\xff\xff\x0f"    # frame 3's length: nonsense
    data[offsets[4] + 3000:offsets[5] + 2000] = bytes(offsets[5] - offsets[4] - 1000)   # zeroed run
    seg.write_bytes(bytes(data))
    again = Spool(str(tmp_path), segment_bytes=64 << 10)
    assert payloads(again) == [bytes([n]) * 6000 for n in range(12) if n not in (2, 4, 5)]
    assert again.recovery_lost_frames == 3
    assert [note.split(";")[0].split(": ")[1] for note in again.recovery_notes] == [
        "implausible frame length 268435440 at offset %d" % offsets[2],
        "CRC mismatch at offset %d" % offsets[4]]


def test_losing_acknowledged_frames_is_noted_but_not_counted(tmp_path):
    names = _spool_of_segments(tmp_path)
    spool = Spool(str(tmp_path), segment_bytes=64 << 10)
    for ref, _ in list(spool.pending())[:3]:
        spool.ack(ref)
    spool.close()
    seg = tmp_path / names[0]
    data = bytearray(seg.read_bytes())
    data[_frame_offsets(data)[1] + 100] ^= 0xFF
    seg.write_bytes(bytes(data))
    again = Spool(str(tmp_path), segment_bytes=64 << 10)
    assert again.recovery_lost_frames == 0
    assert "all already acknowledged" in again.recovery_notes[0]
    assert [ref.frame_no for ref, _ in again.pending()] == list(range(4, 13))


def test_zero_filled_tail_is_not_a_frame(tmp_path):
    spool = Spool(str(tmp_path))
    spool.append(b"only")
    spool.close()
    seg = tmp_path / segments(tmp_path)[0]
    with open(seg, "ab") as handle:
        handle.write(bytes(4096))
    again = Spool(str(tmp_path))
    assert payloads(again) == [b"only"]
    assert "implausible frame length 0" in again.recovery_notes[0]


def test_ack_persists_across_reopen_and_deletes_segments(tmp_path):
    spool = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=64 << 10)
    refs = [spool.append(bytes([n % 256]) * 10_000) for n in range(20)]
    assert len(segments(tmp_path)) > 2
    for ref in refs[:12]:
        spool.ack(ref)
    spool.close()
    again = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=64 << 10)
    assert [ref.frame_no for ref, _ in again.pending()] == list(range(13, 21))
    # Segments that held only acknowledged frames are gone.
    assert int(segments(tmp_path)[0][4:-4]) > 1
    # Out-of-order acks advance the durable mark only once contiguous.
    pending = [ref for ref, _ in again.pending()]
    again.ack(pending[1])
    assert [r.frame_no for r, _ in again.pending()] == [13] + list(range(15, 21))
    again.ack(pending[0])
    again.close()
    third = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=64 << 10)
    assert [ref.frame_no for ref, _ in third.pending()] == list(range(15, 21))


def test_newest_frame_survives_full_acknowledgement(tmp_path):
    spool = Spool(str(tmp_path), segment_bytes=64 << 10)
    refs = [spool.append(bytes([n]) * 30_000) for n in range(6)]
    for ref in refs:
        spool.ack(ref)
    spool.close()
    again = Spool(str(tmp_path), segment_bytes=64 << 10)
    assert list(again.pending()) == []
    assert again.last_frame() == bytes([5]) * 30_000
    assert again.append(b"more").frame_no == 7


def test_full_spool_refuses_then_recovers_after_ack(tmp_path):
    spool = Spool(str(tmp_path), max_bytes=200_000, segment_bytes=64 << 10)
    refs = []
    with pytest.raises(SpoolFull, match="is full"):
        for _ in range(100):
            refs.append(spool.append(b"z" * 20_000))
    assert spool.full and spool.used_bytes <= 200_000
    for ref in refs[:6]:
        spool.ack(ref)
    assert not spool.full
    spool.append(b"z" * 20_000)


def test_full_spool_blocks_until_space(tmp_path):
    spool = Spool(str(tmp_path), max_bytes=150_000, on_full="block",
                  segment_bytes=64 << 10, block_timeout=10)
    refs = [spool.append(b"b" * 30_000) for _ in range(4)]
    done = threading.Event()

    def writer():
        for _ in range(3):
            spool.append(b"b" * 30_000)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert not done.wait(0.3) and spool.full
    for ref in refs:
        spool.ack(ref)
    assert done.wait(5)
    thread.join()
    with pytest.raises(ValueError):
        Spool(str(tmp_path / "other"), on_full="drop")


def test_group_commit_from_many_threads_keeps_order(tmp_path):
    spool = Spool(str(tmp_path), segment_bytes=64 << 10)

    def worker(thread_no):
        for n in range(50):
            spool.append(f"{thread_no}/{n}/".encode() + b"p" * 300)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    frames = [ref.frame_no for ref, _ in spool.pending()]
    assert frames == list(range(1, 201))
    # Each thread's frames stay in the order that thread appended them.
    per_thread = {}
    for _, data in spool.pending():
        thread_no, n, _ = data.split(b"/")
        per_thread.setdefault(thread_no, []).append(int(n))
    assert all(numbers == list(range(50)) for numbers in per_thread.values())
    assert len(per_thread) == 4
    spool.close()
    again = Spool(str(tmp_path), segment_bytes=64 << 10)
    assert [ref.frame_no for ref, _ in again.pending()] == frames


def test_frames_numbered_far_past_the_start_are_recovered(tmp_path):
    """A long-lived spool whose acknowledged segments are gone holds only high frame numbers;
    recovery must take them (and resync among them) like any others."""
    spool = Spool(str(tmp_path))
    spool._next_frame = 5_000_000          # as after millions of shipped and deleted frames
    for n in range(4):
        spool.append(bytes([n]) * 50)
    spool.close()
    assert segments(tmp_path) == ["seg-0000000005000000.wal"]
    again = Spool(str(tmp_path))
    assert [ref.frame_no for ref, _ in again.pending()] == [5_000_000 + n for n in range(4)]
    assert again.recovery_notes == []
    again.close()
    seg = tmp_path / segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[1 * 66:1 * 66 + 4] = b"\xff\xff\xff\xff"    # the second frame's length
    seg.write_bytes(bytes(data))
    third = Spool(str(tmp_path))
    assert [ref.frame_no for ref, _ in third.pending()] == [5_000_000, 5_000_002, 5_000_003]
    assert third.append(b"more").frame_no == 5_000_004
