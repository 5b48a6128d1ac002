"""A writer process is kill -9'ed at random points while appending, 50 times: after
each restart the spool recovers, every batch acknowledged to the writer (durable after
flush) is intact, and the chain continues without a gap."""

import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest

from records.codec import GENESIS_HASH
from records.signing import load_or_create_key
from records.spool import Spool
from records.verifier import verify_batches

ROUNDS = int(os.environ.get("WARDEN_CRASH_ROUNDS", "50"))

WRITER = r"""
import random, sys
from records.signing import load_or_create_key
from records.spool import Spool
from records.writer import RecordWriter
spool_dir, state_dir, key_path = sys.argv[1:4]
spool = Spool(spool_dir, segment_bytes=64 << 10)
writer = RecordWriter("agent-crash", load_or_create_key(key_path), state_dir, spool,
                      batch_max_events=random.choice([1, 7, 64]), batch_max_delay=0.01)
print("start", writer.last_seq, flush=True)
while True:
    for _ in range(random.randint(1, 40)):
        writer.emit("pg.statement", {"text": "SELECT * FROM t WHERE id = %d" % random.randint(1, 10**6),
                                     "kind": "select", "tables": ["t"]})
    writer.flush()
    print("durable", writer.last_seq, flush=True)
"""


class LineReader:
    """Lines from a child's stdout without blocking past a deadline."""

    def __init__(self, stream):
        self.stream, self.buffer, self.lines = stream, b"", []

    def read(self, until, max_lines=None):
        while time.monotonic() < until and (max_lines is None or len(self.lines) < max_lines):
            ready, _, _ = select.select([self.stream], [], [],
                                        max(0.0, until - time.monotonic()))
            if not ready:
                break
            chunk = os.read(self.stream.fileno(), 65536)
            if not chunk:
                break
            self.buffer += chunk
            *complete, self.buffer = self.buffer.split(b"\n")
            self.lines += [line.decode() for line in complete]
        taken, self.lines = self.lines, []
        return taken


@pytest.mark.timeout(120)
def test_kill_9_while_appending(tmp_path):
    spool_dir, state_dir, key_path = (str(tmp_path / n) for n in ("spool", "state", "key"))
    public_key = load_or_create_key(key_path).public_key()
    rng = random.Random(os.environ.get("WARDEN_CRASH_SEED", "3"))
    acknowledged = 0                  # highest seq a flush() confirmed as durable
    verified_frames, head_seq, head_hash = 0, 0, GENESIS_HASH
    started = time.monotonic()
    for round_no in range(ROUNDS):
        process = subprocess.Popen([sys.executable, "-c", WRITER, spool_dir, state_dir,
                                    key_path], stdout=subprocess.PIPE, cwd=str(tmp_path))
        reader = LineReader(process.stdout)
        try:
            lines = reader.read(time.monotonic() + 10, max_lines=1)
            assert lines and lines[0].startswith("start"), "writer did not start"
            # The chain resumes exactly where the durable spool ends.
            assert int(lines[0].split()[1]) == head_seq
            lines = lines[1:] + reader.read(time.monotonic() + rng.uniform(0.02, 0.25))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        lines += reader.read(time.monotonic() + 2)      # what it printed before dying
        process.stdout.close()
        durable = [int(line.split()[1]) for line in lines if line.startswith("durable")]
        if durable:
            acknowledged = max(acknowledged, max(durable))

        spool = Spool(spool_dir, segment_bytes=64 << 10)     # recovery, as at restart
        frames = [data for _, data in spool.pending()]
        spool.close()
        assert len(frames) >= verified_frames
        report = verify_batches(frames[verified_frames:], public_key,
                                start_seq=head_seq + 1, start_hash=head_hash)
        assert report.ok, (round_no, report.problems)
        assert report.last_seq >= acknowledged, (round_no, report.last_seq, acknowledged)
        verified_frames, head_seq, head_hash = len(frames), report.last_seq, report.last_hash

    spool = Spool(spool_dir, segment_bytes=64 << 10)
    everything = verify_batches([data for _, data in spool.pending()], public_key)
    spool.close()
    assert everything.ok and everything.last_seq == head_seq >= acknowledged > 0
    assert time.monotonic() - started < 60
