"""The sparse communication graph of SecAgg+: who shares secrets and masks with whom.

A Harary graph H(k, n) over the round's devices in an order every party derives alike
from the public round seed (each id sorted by HMAC-SHA256 under the seed): device at
position p neighbours the positions p ± 1 .. p ± k/2 (mod n). Symmetric, every node of
degree k (k even; k ≥ n - 1 gives the complete graph, plain SecAgg). Bell et al. (2020)
show O(log n) neighbours suffice against a bounded fraction of corrupt or dropped
devices; the permutation is what keeps the server from placing devices next to each
other, since it fixes the seed before it knows the keys.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from protocol.secagg.errors import SecAggError


def order(ids: Iterable[str], seed: bytes) -> list[str]:
    unique = sorted(set(ids))
    return sorted(unique, key=lambda cid: hmac.new(seed, cid.encode(), hashlib.sha256).digest())


def neighbours(ids: Iterable[str], seed: bytes, degree: int) -> dict[str, list[str]]:
    """Each id's neighbours, sorted. ``degree`` is rounded up to even and capped at n - 1."""
    ring = order(ids, seed)
    n = len(ring)
    if degree < 1:
        raise SecAggError("the graph degree is at least 1")
    if degree >= n - 1:
        return {cid: sorted(c for c in ring if c != cid) for cid in ring}
    half = (degree + 1) // 2
    out: dict[str, list[str]] = {}
    for p, cid in enumerate(ring):
        near = {ring[(p + d) % n] for d in range(1, half + 1)}
        near |= {ring[(p - d) % n] for d in range(1, half + 1)}
        out[cid] = sorted(near)
    return out
