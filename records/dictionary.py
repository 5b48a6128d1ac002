"""zstd dictionaries for batches: which ones exist, and how the shipped one was made.

A batch compressed with a dictionary names it in its zstd frame header (the frame's
dictionary id), so a reader picks the right one per frame; a frame with id 0 was
written without a dictionary (spools and collectors from before dictionaries). The
collector keeps batches as evidence for years, so a dictionary that was ever shipped
must stay in the package forever: add new ones next to it under a new id, never
replace or delete one.

Dictionaries are package data ``records/warden-<id>.zdict``. Their ids lie in
[32768, 2**31), the range zstd leaves free for private use. ``CURRENT_ID`` is the one
writers use.

Regenerate (deterministic corpus, see records.corpus):
    python -m records.dictionary train --id 1464074241 --out records/warden-1464074241.zdict
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import re

import zstandard

CURRENT_ID = 0x5744_0001          # "WD", dictionary number 1
DICT_BYTES = 16 << 10
TRAIN_SEED = 20240601
TRAIN_EVENTS = 120_000
_NAME = re.compile(r"^warden-(\d+)\.zdict$")


class UnknownDictionary(LookupError):
    """A frame names a dictionary this reader does not have."""


@functools.cache
def _shipped() -> dict[int, bytes]:
    found = {}
    for entry in importlib.resources.files("records").iterdir():
        match = _NAME.match(entry.name)
        if match:
            data = entry.read_bytes()
            dict_id = zstandard.ZstdCompressionDict(data).dict_id()
            if dict_id != int(match.group(1)):
                raise RuntimeError(f"records/{entry.name} holds dictionary id {dict_id}; the "
                                   f"file name and the id inside must agree")
            found[dict_id] = data
    return found


def known_ids() -> list[int]:
    return sorted(_shipped())


@functools.cache
def get(dict_id: int) -> zstandard.ZstdCompressionDict:
    data = _shipped().get(dict_id)
    if data is None:
        raise UnknownDictionary(
            f"zstd dictionary {dict_id} is not in this build (it has "
            f"{', '.join(map(str, known_ids())) or 'none'}); upgrade the reader")
    return zstandard.ZstdCompressionDict(data)


def current() -> zstandard.ZstdCompressionDict | None:
    """The dictionary new batches are written with (None if the build has none)."""
    try:
        return get(CURRENT_ID)
    except UnknownDictionary:
        return None


# -- training ---------------------------------------------------------------------------
def training_samples(events: int = TRAIN_EVENTS, seed: int = TRAIN_SEED) -> list[bytes]:
    """Uncompressed batch bodies, as the writer produces them, of the seeded corpus.

    Batch sizes vary from 1 to 128 events because the writer cuts a batch after
    ``batch_max_delay``: quiet hosts ship small batches, where a dictionary helps most.
    """
    import random

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from records.batch import BatchBuilder
    from records.codec import GENESIS_HASH
    from records.corpus import events as corpus_events

    rng = random.Random(seed)
    key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    agents = [f"i-{rng.getrandbits(68):017x}" for _ in range(8)]
    samples, builder, size = [], None, 0
    for ts, sid, event_type, fields in corpus_events(events, seed):
        if builder is None:
            builder = BatchBuilder(rng.choice(agents), GENESIS_HASH, rng.randint(1, 10**7))
            size = rng.choice([1, 2, 4, 8, 16, 32, 64, 128])
        builder.add(ts, sid, event_type, fields)
        if builder.count >= size:
            samples.append(builder.body(key, ts))
            builder = None
    return samples


def train(dict_id: int = CURRENT_ID, size: int = DICT_BYTES, events: int = TRAIN_EVENTS,
          seed: int = TRAIN_SEED) -> bytes:
    if not 32768 <= dict_id < 2**31:
        raise ValueError("private zstd dictionary ids lie in [32768, 2**31)")
    samples = training_samples(events, seed)
    # threads=1 and fixed k/d keep the result a function of the corpus alone.
    trained = zstandard.train_dictionary(size, samples, dict_id=dict_id, k=1024, d=8,
                                         level=3, threads=1)
    return trained.as_bytes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the records zstd dictionary")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("train")
    cmd.add_argument("--id", type=int, default=CURRENT_ID)
    cmd.add_argument("--size", type=int, default=DICT_BYTES)
    cmd.add_argument("--events", type=int, default=TRAIN_EVENTS)
    cmd.add_argument("--seed", type=int, default=TRAIN_SEED)
    cmd.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    data = train(args.id, args.size, args.events, args.seed)
    with open(args.out, "wb") as handle:
        handle.write(data)
    print(f"wrote {args.out}: dictionary {args.id}, {len(data)} bytes")


if __name__ == "__main__":
    main()
