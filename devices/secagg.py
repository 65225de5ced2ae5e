"""A device's part in a SecAgg+ round: wire messages in, wire messages out.

Wraps ``protocol.secagg.DeviceSession`` around the device's trainer: keys on the round's
announcement, share boxes on the roster, and on the inbox it trains, folds its sample
count into the delta, quantises it to Z_2^32 at the announced clip and scale, masks it and
returns it as an ordinary update blob (one uint32 tensor, ``secagg.masked``, through the
codec with all its checks). On the unmasking request it reveals one share per neighbour;
the session refuses to reveal both of one peer.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from learning.params import Arrays
from protocol import codec
from protocol.messages import (
    PeerKeys,
    RevealedShare,
    SecAggInbox,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
    UpdateMeta,
)
from protocol.secagg import DeviceSession, SecAggError, flatten, layout_of, quantize
from protocol.secagg.ring import Layout

MASKED = "secagg.masked"

# (global weights, round) -> the trained delta of float tensors, and its metrics
TrainDelta = Callable[[Mapping[str, np.ndarray], int], tuple[Arrays, dict[str, float]]]


def context_of(run_id: str, round_number: int, attempt: int) -> bytes:
    """Must equal ``orchestrator.state.secagg.context_of`` (a test checks they agree)."""
    return f"fedmq-secagg\n{run_id}\n{round_number}\n{attempt}".encode()


def float_layout(weights: Mapping[str, np.ndarray]) -> Layout:
    return layout_of({n: v for n, v in weights.items() if np.asarray(v).dtype.kind == "f"})


@dataclass
class SecAggDevice:
    run_id: str
    client_id: str
    num_samples: int
    train_delta: TrainDelta
    session: DeviceSession | None = None
    round: int = -1
    attempt: int = 1
    roster: SecAggRoster | None = None
    # The quantised update before masking: kept on the device only (tests compare sums).
    last_quantized: np.ndarray | None = None

    def on_round(self, round_number: int, attempt: int = 1) -> SecAggKeys:
        ctx = context_of(self.run_id, round_number, attempt)
        self.session = DeviceSession(self.client_id, ctx, b"", 0, 0)
        self.round, self.attempt, self.roster = round_number, attempt, None
        c_pub, s_pub = self.session.advertise()
        keys = PeerKeys(c_pub=c_pub.hex(), s_pub=s_pub.hex(), num_samples=self.num_samples)
        return SecAggKeys(
            run_id=self.run_id,
            client_id=self.client_id,
            round=round_number,
            attempt=attempt,
            keys=keys,
        )

    def _session(self, round_number: int, attempt: int) -> DeviceSession:
        if self.session is None or (round_number, attempt) != (self.round, self.attempt):
            raise SecAggError(f"no secure session for round {round_number} attempt {attempt}")
        return self.session

    def on_roster(self, msg: SecAggRoster) -> SecAggShares:
        s = self._session(msg.round, msg.attempt)
        mine = msg.keys.get(self.client_id)
        if mine is None or mine.num_samples != self.num_samples:
            raise SecAggError("the roster does not carry this device's sample count")
        s.graph_seed, s.degree, s.threshold = (
            bytes.fromhex(msg.graph_seed),
            msg.degree,
            msg.threshold,
        )
        roster = {c: (bytes.fromhex(k.c_pub), bytes.fromhex(k.s_pub)) for c, k in msg.keys.items()}
        boxes = s.share_keys(roster)
        self.roster = msg
        return SecAggShares(
            run_id=self.run_id,
            client_id=self.client_id,
            round=msg.round,
            attempt=msg.attempt,
            boxes={j: _b64(b) for j, b in boxes.items()},
        )

    def on_inbox(
        self, msg: SecAggInbox, global_weights: Mapping[str, np.ndarray], model_version: int
    ) -> tuple[UpdateMeta, bytes]:
        s = self._session(msg.round, msg.attempt)
        if msg.client_id != self.client_id or self.roster is None:
            raise SecAggError("an inbox for another device, or before the roster")
        s.receive_shares({sender: _unb64(box) for sender, box in msg.boxes.items()})
        d, metrics = self.train_delta(global_weights, msg.round)
        vec = flatten(d, float_layout(global_weights))
        q = quantize(vec, self.num_samples, self.roster.clip, self.roster.scale)
        self.last_quantized = q
        blob = codec.encode({MASKED: s.mask(q)}, codec.Encoding.FP32)
        meta = UpdateMeta(
            run_id=self.run_id,
            client_id=self.client_id,
            round=msg.round,
            base_model_version=model_version,
            num_samples=self.num_samples,
            encoding=codec.Encoding.FP32,
            is_delta=True,
            blob_sha256=hashlib.sha256(blob).hexdigest(),
            blob_bytes=len(blob),
            metrics={k: float(v) for k, v in metrics.items()},
        )
        return meta, blob

    def on_unmask(self, msg: SecAggUnmask) -> SecAggReveal:
        s = self._session(msg.round, msg.attempt)
        shares = s.unmask(msg.survivors, msg.dropped)
        return SecAggReveal(
            run_id=self.run_id,
            client_id=self.client_id,
            round=msg.round,
            attempt=msg.attempt,
            shares={o: RevealedShare(kind=k, share=v.hex()) for o, (k, v) in shares.items()},  # type: ignore[arg-type]
        )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
