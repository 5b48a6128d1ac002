"""What every fuzz target shares: a per-input time limit, mutation operators, and counters."""
from __future__ import annotations

import random
import signal
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

# A sans-IO core does microseconds of work per input; a second means a loop that does not end.
HANG_SECONDS = 2


class Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise Hang(f"one input took more than {HANG_SECONDS} s")


@contextmanager
def time_limit(seconds: int = HANG_SECONDS):
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class PropertyViolation(AssertionError):
    """The core accepted or produced something it must not (not a crash, but as bad)."""


@dataclass
class Stats:
    target: str
    inputs: int = 0
    crashes: int = 0             # unexpected exceptions
    violations: int = 0          # properties broken (bad output, bad error)
    hangs: int = 0
    rejected: int = 0            # inputs that ended in the documented protocol-error path
    checked: int | None = None   # accepted messages whose forwarding property was checked (HTTP targets)
    seconds: float = 0.0
    examples: list = field(default_factory=list)

    def record_failure(self, kind: str, data, exc: BaseException) -> None:
        if kind == "hang":
            self.hangs += 1
        elif kind == "violation":
            self.violations += 1
        else:
            self.crashes += 1
        if len(self.examples) < 5:
            self.examples.append({"kind": kind, "error": f"{type(exc).__name__}: {exc}"[:300],
                                  "input": repr(data)[:300]})

    @property
    def ok(self) -> bool:
        return self.crashes == 0 and self.hangs == 0 and self.violations == 0 and self.inputs > 0


def run_one(stats: Stats, fn, data) -> None:
    """Run fn(data) under the time limit, classifying the outcome."""
    stats.inputs += 1
    try:
        with time_limit():
            if fn(data):
                stats.rejected += 1
    except Hang as exc:
        stats.record_failure("hang", data, exc)
    except PropertyViolation as exc:
        stats.record_failure("violation", data, exc)
    except Exception as exc:   # anything else escaping a protocol core is a crash
        stats.record_failure("crash", data, exc)


# -- mutations ------------------------------------------------------------------------------
INTERESTING_I32 = (0, 1, 3, 4, 5, 7, 8, 0x7F, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 10000, 10001,
                   0x7FFFFFFF, -1, -4, -0x80000000, 64 * 1024 * 1024 + 1, 1 << 30)


def mutate(rng: random.Random, data: bytes, boundaries: list[int] = (), rounds: int | None = None,
           corpus: list[bytes] = ()) -> bytes:
    """Bit flips, byte sets, truncation, length fields rewritten, random insertions, splices."""
    buf = bytearray(data)
    for _ in range(rounds or rng.randint(1, 4)):
        op = rng.randrange(9)
        if op == 0 and buf:                                   # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:                                 # set a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2 and buf:                                 # truncate
            del buf[rng.randrange(len(buf)):]
        elif op == 3 and boundaries:                          # rewrite a length field
            pos = rng.choice(boundaries)
            if pos + 4 <= len(buf):
                value = rng.choice(INTERESTING_I32) if rng.random() < 0.6 else \
                    struct.unpack_from("!i", buf, pos)[0] + rng.randint(-8, 8)
                struct.pack_into("!i", buf, pos, max(-0x80000000, min(0x7FFFFFFF, value)))
        elif op == 4:                                         # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 5 and buf:                                 # delete a span
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, 16)]
        elif op == 6 and buf:                                 # duplicate a span
            i = rng.randrange(len(buf))
            span = buf[i:i + rng.randint(1, 64)]
            j = rng.randrange(len(buf) + 1)
            buf[j:j] = span
        elif op == 7 and corpus:                              # splice with another seed
            other = rng.choice(corpus)
            i = rng.randrange(len(buf) + 1)
            buf[i:] = other[rng.randrange(len(other) + 1):]
        elif op == 8:                                         # random tail
            buf += rng.randbytes(rng.randint(1, 32))
    return bytes(buf)


def split_points(rng: random.Random, data: bytes) -> list[bytes]:
    """Cut a stream into the chunks a socket might deliver."""
    if len(data) < 2 or rng.random() < 0.3:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 6))))
    out, prev = [], 0
    for c in cuts:
        out.append(data[prev:c])
        prev = c
    out.append(data[prev:])
    return out


def timed(stats: Stats):
    class _T:
        def __enter__(self):
            self.t = time.monotonic()

        def __exit__(self, *exc):
            stats.seconds += time.monotonic() - self.t
    return _T()
