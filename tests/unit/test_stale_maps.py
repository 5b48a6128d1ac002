"""Reading back a BPF ring buffer's records, bytes-level: the kernel's record header (length,
busy bit, discard bit), 8-byte alignment, positions that keep growing past the ring's size,
and a record that wraps (the data area is mapped twice, so it reads contiguously)."""
import struct

from agent.stale_maps import parse_ring

BUSY, DISCARD = 1 << 31, 1 << 30


def ring(size, records, start=0):
    """A ring of `size` bytes holding `records` (payload, flags) from position `start`; returns
    the data area mapped twice and the producer position."""
    area = bytearray(size)
    pos = start
    for payload, flags in records:
        frame = struct.pack("<II", len(payload) | flags, 0) + payload
        frame += b"\0" * (-len(frame) % 8)
        for i, byte in enumerate(frame):
            area[(pos + i) % size] = byte
        pos += len(frame)
    return bytes(area) * 2, pos


def test_records_in_order_with_their_exact_lengths():
    data, end = ring(64, [(b"abc", 0), (b"0123456789", 0)])
    assert parse_ring(data, 64, 0, end) == [b"abc", b"0123456789"]


def test_a_discarded_record_is_skipped_and_what_follows_is_kept():
    data, end = ring(64, [(b"gone", DISCARD), (b"kept", 0)])
    assert parse_ring(data, 64, 0, end) == [b"kept"]


def test_reading_stops_at_a_record_still_being_written():
    data, end = ring(128, [(b"done", 0), (b"half", BUSY), (b"after", 0)])
    assert parse_ring(data, 128, 0, end) == [b"done"]


def test_only_what_the_consumer_has_not_read_yet():
    data, end = ring(64, [(b"read", 0), (b"unread", 0)])
    assert parse_ring(data, 64, 16, end) == [b"unread"]
    assert parse_ring(data, 64, end, end) == []


def test_positions_past_the_size_and_a_record_that_wraps():
    # positions count every byte ever written: 1000 is offset 1000 % 64 = 40 in the area
    data, end = ring(64, [(b"x" * 20, 0), (b"wraps-around-the-end", 0)], start=1000)
    assert end - 1000 == 32 + 32
    assert parse_ring(data, 64, 1000, end) == [b"x" * 20, b"wraps-around-the-end"]
