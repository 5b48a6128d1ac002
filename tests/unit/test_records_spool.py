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


def test_crc_mismatch_is_detected(tmp_path):
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
    assert payloads(again) == [bytes([0]) * 50, bytes([1]) * 50]
    assert "CRC mismatch at offset %d" % (2 * frame) in again.recovery_notes[0]


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
