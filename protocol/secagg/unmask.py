"""The server's side of unmasking: the ring sum of the survivors' inputs, masks removed.

The aggregator (a worker) gets the masked inputs of the survivors, the public roster, who
shared keys, and the shares survivors revealed. For each survivor it reconstructs the
self-mask seed ``b`` and removes ``PRG(b)``; for each device that shared keys but sent no
input it reconstructs the mask secret key (checked against its advertised public key) and
removes the pairwise masks its surviving neighbours added. What is left is the sum of
the survivors' quantised updates, and nothing else: no single input is ever unmasked.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from protocol.secagg import graph, keys, prg, ring, shamir
from protocol.secagg.device import SECRET_KEY, SELF_MASK, share_point
from protocol.secagg.errors import SecAggError

# reporter -> {owner -> (kind, share bytes)}
Revealed = Mapping[str, Mapping[str, tuple[str, bytes]]]


def _shares_of(
    owner: str, kind: str, revealed: Revealed, roster: Collection[str], holders: Collection[str]
) -> dict[int, int]:
    out: dict[int, int] = {}
    for reporter, shares in revealed.items():
        got = shares.get(owner)
        if got is None or reporter not in holders:
            continue
        if got[0] != kind:
            raise SecAggError(f"{reporter} revealed {owner}'s {got[0]} share, not its {kind}")
        out[share_point(roster, reporter)] = shamir.from_bytes(got[1])
    return out


def unmask_sum(
    masked: Mapping[str, np.ndarray],
    roster: Mapping[str, tuple[bytes, bytes]],
    sharers: Collection[str],
    revealed: Revealed,
    *,
    graph_seed: bytes,
    degree: int,
    threshold: int,
    context: bytes,
) -> np.ndarray:
    """``sum(x_i for i in masked)`` in Z_2^32, or ``SecAggError`` naming what is missing."""
    if not masked:
        raise SecAggError("no masked inputs to sum")
    u2 = set(sharers)
    if not set(masked) <= u2:
        raise SecAggError(f"inputs from devices that shared no keys: {sorted(set(masked) - u2)}")
    if len(masked) < threshold:
        raise SecAggError(f"{len(masked)} survivors, fewer than the threshold {threshold}")
    near = graph.neighbours(roster, graph_seed, degree)
    length = {v.size for v in masked.values()}
    if len(length) != 1:
        raise SecAggError(f"masked inputs of different lengths {sorted(length)}")
    (n,) = length
    total = np.zeros(n, dtype=np.uint32)
    for v in masked.values():
        total = ring.add(total, v)
    for i in sorted(masked):
        got = _shares_of(i, SELF_MASK, revealed, roster, set(near[i]) & set(masked))
        _enough(got, threshold, f"self-mask shares of survivor {i}")
        total = ring.sub(total, prg.expand(shamir.combine(got, threshold), n))
    for j in sorted(u2 - set(masked)):
        got = _shares_of(j, SECRET_KEY, revealed, roster, set(near[j]) & set(masked))
        _enough(got, threshold, f"key shares of dropped device {j}")
        s_private = shamir.combine(got, threshold)
        if keys.public_of(s_private) != roster[j][1]:
            raise SecAggError(f"the key shares of {j} do not rebuild its advertised key")
        total = _remove_pair_masks(
            total, j, s_private, [i for i in near[j] if i in masked], roster, context
        )
    return total


def _enough(got: Mapping[int, int], threshold: int, what: str) -> None:
    if len(got) < threshold:
        raise SecAggError(f"{len(got)} {what}, fewer than the threshold {threshold}")


def _remove_pair_masks(
    total: np.ndarray,
    dropped: str,
    s_private: bytes,
    survivors: list[str],
    roster: Mapping[str, tuple[bytes, bytes]],
    context: bytes,
) -> np.ndarray:
    for i in survivors:
        m = prg.expand(keys.mask_seed(s_private, roster[i][1], context), total.size)
        # i added +m when i sorts before the dropped device: take it off again.
        total = ring.sub(total, m) if i < dropped else ring.add(total, m)
    return total
