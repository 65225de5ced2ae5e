"""Hierarchical aggregation's pieces that need no database: how a round is cut into parts,
what names a round's set of updates, and the stored form of one part's partial sum.

A part is a contiguous run of the round's updates in client-id order
(``part_bounds``), folded into ``Σ n_k Δ_k`` and ``Σ n_k`` in float64
(``learning.strategies.PartialSum``). The sums must survive storage exactly, and the
codec decodes every float tensor as float32; so a partial blob holds each float64 sum
*reinterpreted* as uint64 (``ndarray.view``), which the codec stores raw and returns bit
for bit, and the decoder views it back. Nothing new in the codec, no pickle: it is an
ordinary codec blob (zstd, CRC, bounded decoding) that only this module reads as sums.
The header's metadata says what the blob is (``kind``), whose part it is (run, round,
part, parts, the round's update digest) and the exact total weight (``float.hex``), and
the decoder checks all of it, so a blob is never added into the wrong round.

Integer counters (BatchNorm's ``num_batches_tracked``) travel as their maximum over the
part's updates; the combine takes the maximum over the parts, as the flat fold does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np

from learning.strategies import PartialSum
from protocol.codec import DecodeLimits, Encoding, TensorSpec, decode, encode
from workers.fold import GlobalModel, UpdateRef

Weights = dict[str, np.ndarray]

KIND = "fedmq.partial-sum/1"
_SUM_DTYPE = np.dtype(np.uint64)  # float64 bits, stored raw by the codec


class PartialBlobError(ValueError):
    """A partial-sum blob is not the one expected, or not a partial sum at all."""


@dataclasses.dataclass(frozen=True)
class PartLabel:
    """Whose partial sum a blob holds; written to and checked against its header."""

    run_id: str
    round_number: int
    part: int
    parts: int
    digest: str

    def metadata(self) -> dict[str, str]:
        return {
            "kind": KIND,
            "run_id": self.run_id,
            "round": str(self.round_number),
            "part": str(self.part),
            "parts": str(self.parts),
            "updates": self.digest,
        }


def part_bounds(num_updates: int, parts: int, part: int) -> tuple[int, int]:
    """Positions [lo, hi) of part ``part`` of ``parts`` among ``num_updates`` updates:
    contiguous, disjoint, covering all of them, sizes differing by at most one."""
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts} does not exist")
    return part * num_updates // parts, (part + 1) * num_updates // parts


def updates_digest(base_sha: str, updates: Sequence[UpdateRef]) -> str:
    """SHA-256 naming a round's base model and updates (client, blob, samples, in order):
    every part and the combine must agree on it, or they would fold different rounds."""
    rows = [[u.client_id, u.blob_sha, u.num_samples] for u in updates]
    text = json.dumps([base_sha, rows], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def encode_partial(
    partial: PartialSum, counters: Mapping[str, np.ndarray], label: PartLabel
) -> bytes:
    """The codec blob of one part's sums, weight and counters."""
    overlap = partial.sums.keys() & counters.keys()
    if overlap:
        raise ValueError(f"tensors both summed and counted: {sorted(overlap)[:5]}")
    tensors: dict[str, np.ndarray] = {}
    for name, arr in partial.sums.items():
        if arr.dtype != np.float64:
            raise ValueError(f"partial sum {name!r} is {arr.dtype}, not float64")
        # Not np.ascontiguousarray: it turns a 0-d array (a scalar parameter) into 1-d.
        flat = arr if arr.flags.c_contiguous else arr.copy(order="C")
        tensors[name] = flat.view(_SUM_DTYPE)
    tensors.update(counters)
    meta = {
        **label.metadata(),
        "count": str(partial.count),
        "total_weight": float(partial.total_weight).hex(),  # exact, unlike repr's round trip
    }
    return encode(tensors, Encoding.FP32, metadata=meta)


def sum_limits(limits: DecodeLimits) -> DecodeLimits:
    """Limits for a partial blob: twice the model's (8 bytes a parameter, not 4)."""
    return dataclasses.replace(
        limits,
        max_compressed_bytes=2 * limits.max_compressed_bytes,
        max_decompressed_bytes=2 * limits.max_decompressed_bytes,
    )


def decode_partial(
    blob: bytes, base: GlobalModel, label: PartLabel, limits: DecodeLimits
) -> tuple[PartialSum, Weights]:
    """The sums and counters of ``blob``, checked to be ``label``'s part of a round whose
    model is ``base``; PartialBlobError otherwise (CodecError for a blob that does not
    decode)."""
    spec = {n: TensorSpec(tuple(a.shape), _SUM_DTYPE.name) for n, a in base.floats.items()}
    spec.update({n: TensorSpec(tuple(a.shape), a.dtype.name) for n, a in base.others.items()})
    decoded = decode(blob, limits=sum_limits(limits), expected=spec)
    meta = decoded.metadata
    want = label.metadata()
    wrong = [k for k, v in want.items() if meta.get(k) != v]
    if wrong:
        got = {k: meta.get(k) for k in wrong}
        raise PartialBlobError(f"partial blob is not {want}: it says {got}")
    try:
        count = int(meta["count"])
        total = float.fromhex(meta["total_weight"])
    except (KeyError, ValueError) as e:
        raise PartialBlobError(f"partial blob: bad count or weight: {e}") from None
    if count < 1 or not (total > 0 and np.isfinite(total)):
        raise PartialBlobError(f"partial blob: count {count}, weight {total}")
    sums: Weights = {}
    for name in base.floats:
        values = decoded.tensors[name].view(np.float64)
        if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
            raise PartialBlobError(f"partial sum {name!r} holds NaN or Inf")
        sums[name] = values
    counters = {name: decoded.tensors[name] for name in base.others}
    return PartialSum(sums, total, count), counters
