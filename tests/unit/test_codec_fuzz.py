"""A fixed-budget hypothesis fuzz of ``protocol.codec.decode``: mutations of valid blobs of
every encoding (byte flips, splices, truncations) and of their JSON headers re-packed with a
correct CRC, so that the mutations reach the validation behind the checksum. Whatever comes
in, decode returns or raises CodecError, quickly; nothing else (test_codec_corpus.py holds
the hand-built cases; this finds the ones nobody thought of).

Budget: FEDMQ_FUZZ_EXAMPLES examples per test (CI default below); docs/reliability.md
records it."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import CodecError, DecodeLimits, Encoding, decode, encode
from tests.unit.test_codec_corpus import frame, pack, split

FUZZ_EXAMPLES = int(os.environ.get("FEDMQ_FUZZ_EXAMPLES", "500"))
LIMITS = DecodeLimits(max_decompressed_bytes=1 << 20, max_compressed_bytes=1 << 20)

_rng = np.random.default_rng(0)
_MODEL = {
    "w": _rng.normal(0, 1, (6, 5)).astype(np.float32),
    "b": _rng.normal(0, 1, 5).astype(np.float32),
    "steps": np.array(7, np.int64),
}
SEEDS = [
    encode(_MODEL, Encoding.FP32),
    encode(_MODEL, Encoding.BF16),
    encode(_MODEL, Encoding.FP16, shuffle=True),
    encode(_MODEL, Encoding.INT8),
    encode(_MODEL, Encoding.TOPK, base=_MODEL, base_version="3", topk_fraction=0.2),
    encode({}, Encoding.FP32),
]
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _decode_or_refuse(blob: bytes) -> None:
    # This thread's CPU time: neither a loaded machine's stalls nor other threads' work (a
    # process-wide clock counted 1.47 s once in CI) are decode's. The bound only has to
    # catch a bomb that got decompressed, which costs far more.
    began = time.thread_time()
    with contextlib.suppress(CodecError):
        decode(blob, limits=LIMITS)
    assert time.thread_time() - began < 5.0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=0, max_size=6)), max_size=4),
    cut=st.none() | st.integers(0, 10**6),
)
def test_spliced_and_truncated_blobs_decode_or_are_refused(
    seed: bytes, edits: list[tuple[int, bytes]], cut: int | None
) -> None:
    blob = bytearray(seed)
    for pos, data in edits:
        at = pos % (len(blob) + 1)
        blob[at : at + len(data)] = data
    if cut is not None:
        blob = blob[: cut % (len(blob) + 1)]
    _decode_or_refuse(bytes(blob))


@FUZZ
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_blobs_with_mutated_headers_decode_or_are_refused(seed: bytes, data: st.DataObject) -> None:
    header, payload = split(seed)
    target: Any = header
    if header["tensors"] and data.draw(st.booleans()):
        target = data.draw(st.sampled_from(header["tensors"]))
    key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=6))
    if data.draw(st.booleans()) and key in target:
        del target[key]
    else:
        target[key] = data.draw(JSON)
    body = payload
    if data.draw(st.booleans()):  # the payload changed too, consistently framed
        flips = data.draw(st.lists(st.integers(0, max(len(body) - 1, 0)), max_size=3))
        raw = bytearray(body)
        for i in flips:
            if raw:
                raw[i] ^= 0xFF
        body = bytes(raw)
    _decode_or_refuse(pack(json.dumps(header).encode(), frame(body)))


@FUZZ
@given(head=st.binary(max_size=200), body=st.binary(max_size=200))
def test_arbitrary_headers_and_frames_are_refused(head: bytes, body: bytes) -> None:
    _decode_or_refuse(pack(head, body))
    _decode_or_refuse(pack(head, frame(body)))
