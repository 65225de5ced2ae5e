"""A device's side of one SecAgg+ round, stage by stage (Bell et al. 2020, Flower's stages).

1. ``advertise``: two fresh public keys.
2. ``share_keys(roster)``: from everyone's keys, the device finds its neighbours on the
   round's graph, Shamir-shares a fresh self-mask seed ``b`` and its mask secret key
   ``s_sk`` to them, each share pair encrypted under the pairwise channel key; the
   orchestrator routes the boxes and cannot read them.
3. ``receive_shares(boxes)`` then ``mask(x)``: ``y = x + PRG(b) + sum_j ±PRG(s_ij)`` mod 2^32
   over the neighbours ``j`` whose shares arrived (+ if this id sorts before ``j``).
4. ``unmask(survivors, dropped)``: for each neighbour, the ``b`` share if it survived or
   the ``s_sk`` share if it dropped, never both: with both the server could strip every
   mask off that neighbour's input. A request that would reveal both (in one call or over
   several) is refused.

Pure: no I/O. The caller moves the bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from protocol.secagg import graph, keys, prg, ring, shamir
from protocol.secagg.errors import SecAggError

SELF_MASK = "b"
SECRET_KEY = "sk"


def share_point(roster_ids: Collection[str], holder: str) -> int:
    """The Shamir x-coordinate of the share ``holder`` keeps: its place in the sorted roster."""
    return sorted(roster_ids).index(holder) + 1


def box_context(context: bytes, sender: str, recipient: str) -> bytes:
    return context + b"\x00" + sender.encode() + b"\x00" + recipient.encode()


@dataclass
class DeviceSession:
    client_id: str
    context: bytes  # run and round: binds keys, seeds and boxes to this round
    graph_seed: bytes
    degree: int
    threshold: int
    keys: keys.RoundKeys = field(default_factory=keys.RoundKeys.generate)
    roster: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    neighbours: list[str] = field(default_factory=list)
    held: dict[str, tuple[int, int]] = field(default_factory=dict)  # peer -> (b, sk) shares
    self_seed: bytes | None = None
    masked: bool = False
    revealed: dict[str, str] = field(default_factory=dict)  # peer -> kind revealed

    def advertise(self) -> tuple[bytes, bytes]:
        return self.keys.c_public, self.keys.s_public

    def share_keys(self, roster: Mapping[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """Encrypted share boxes for each neighbour, by recipient id."""
        if self.roster:
            raise SecAggError("keys were already shared this round")
        if roster.get(self.client_id) != self.advertise():
            raise SecAggError("the roster does not carry this device's own keys")
        pairs = {cid: pk for cid, pk in roster.items() if cid != self.client_id}
        if len(set(pairs.values())) != len(pairs) or any(
            pk == self.advertise() for pk in pairs.values()
        ):
            raise SecAggError("the roster repeats a key")
        for c_pub, s_pub in pairs.values():
            keys.check_public(c_pub)
            keys.check_public(s_pub)
        near = graph.neighbours(roster, self.graph_seed, self.degree)[self.client_id]
        if len(near) < self.threshold:
            raise SecAggError(f"{len(near)} neighbours, fewer than the threshold {self.threshold}")
        self.roster = dict(roster)
        self.neighbours = near
        self.self_seed = os.urandom(prg.SEED_BYTES)
        xs = [share_point(roster, j) for j in near]
        b_shares = shamir.split(self.self_seed, self.threshold, xs)
        sk_shares = shamir.split(self.keys.s_private, self.threshold, xs)
        boxes = {}
        for j, x in zip(near, xs, strict=True):
            plain = json.dumps(
                {
                    "from": self.client_id,
                    "to": j,
                    SELF_MASK: shamir.to_bytes(b_shares[x]).hex(),
                    SECRET_KEY: shamir.to_bytes(sk_shares[x]).hex(),
                }
            ).encode()
            key = keys.channel_key(self.keys.c_private, roster[j][0], self.context)
            boxes[j] = keys.encrypt(key, plain, box_context(self.context, self.client_id, j))
        return boxes

    def receive_shares(self, boxes: Mapping[str, bytes]) -> None:
        """Open the boxes neighbours sent this device; their senders are the peers it masks
        with (those whose keys the server will know how to unmask)."""
        if not self.roster or self.masked or self.held:
            raise SecAggError("shares arrive once, after this device shared its own")
        for sender, box in boxes.items():
            if sender not in self.neighbours:
                raise SecAggError(f"{sender} is not a neighbour of {self.client_id}")
            key = keys.channel_key(self.keys.c_private, self.roster[sender][0], self.context)
            plain = keys.decrypt(key, box, box_context(self.context, sender, self.client_id))
            try:
                body = json.loads(plain)
                if body["from"] != sender or body["to"] != self.client_id:
                    raise SecAggError("a share box names another sender or recipient")
                b = shamir.from_bytes(bytes.fromhex(body[SELF_MASK]))
                sk = shamir.from_bytes(bytes.fromhex(body[SECRET_KEY]))
            except (ValueError, KeyError, TypeError) as e:
                raise SecAggError(f"a malformed share box from {sender}: {e}") from None
            self.held[sender] = (b, sk)

    def mask(self, quantized: np.ndarray) -> np.ndarray:
        """The masked input: what the server may see of this device's update."""
        if self.self_seed is None or self.masked:
            raise SecAggError("masking needs shared keys, and happens once")
        if quantized.dtype != np.uint32:
            raise SecAggError("a masked input is a uint32 vector in the ring")
        n = quantized.size
        y = ring.add(quantized, prg.expand(self.self_seed, n))
        for j in sorted(self.held):
            seed = keys.mask_seed(self.keys.s_private, self.roster[j][1], self.context)
            m = prg.expand(seed, n)
            y = ring.add(y, m) if self.client_id < j else ring.sub(y, m)
        self.masked = True
        return y

    def unmask(
        self, survivors: Collection[str], dropped: Collection[str]
    ) -> dict[str, tuple[str, bytes]]:
        """Shares to reveal, by the peer they belong to: (kind, share)."""
        alive, gone = set(survivors), set(dropped)
        if not self.masked:
            raise SecAggError("this device sent no masked input this round")
        if self.client_id not in alive:
            raise SecAggError("the survivor list leaves this device out")
        both = alive & gone
        if both:
            raise SecAggError(f"asked for both kinds of share of {sorted(both)}")
        if len(alive) < self.threshold:
            raise SecAggError(f"{len(alive)} survivors, fewer than the threshold {self.threshold}")
        out: dict[str, tuple[str, bytes]] = {}
        for peer, (b, sk) in self.held.items():
            kind = SELF_MASK if peer in alive else SECRET_KEY if peer in gone else None
            if kind is None:
                continue
            if self.revealed.get(peer, kind) != kind:
                raise SecAggError(
                    f"{peer}'s {self.revealed[peer]} share was revealed already; "
                    f"refusing its {kind} share too"
                )
            out[peer] = (kind, shamir.to_bytes(b if kind == SELF_MASK else sk))
        for peer, (kind, _) in out.items():
            self.revealed[peer] = kind
        return out
