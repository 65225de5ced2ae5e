"""A ``FederatedClient``'s secure rounds: the SecAgg+ stages on top of its usual loop.

An announcement whose ``train_config`` says ``secagg`` (a secure run: every announcement
of it does) does not start training at once. Once the announced model is held, the device
starts a ``SecAggDevice`` session for the round attempt and sends its keys; on the roster
(a broadcast) it sends its share boxes; on its inbox it trains, quantises, masks and sends
the masked vector as its update; on the unmask request it reveals one share per
neighbour. One session at a time: a newer attempt replaces an older one.

Central DP with SecAgg+ (``train_config``: ``secagg_l2_clip``, ``secagg_unit_weight``):
the delta is clipped to that L2 norm before quantisation, and with unit weight the device
announces weight 1 instead of its sample count (DP-FedAvg's uniform average; the noise is
the worker's, after unmasking).

Training (with the shares' decryption and the masking) runs on a thread of its own when
the inbox arrives, as ``TrainingSlot``'s does: the loop keeps heartbeating and reading its
queue, and collects the masked input (``collect``) to send it. Nothing else touches the
session meanwhile: the unmask request can only follow the masked input.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from devices.config import TrainSettings
from devices.rounds import Job
from devices.secagg import SecAggDevice
from devices.training import SharedCompute
from learning.params import Arrays, delta
from learning.privacy import privatize_update
from learning.privacy.mechanism import noise_generator
from protocol.messages import (
    SecAggInbox,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
    UpdateMeta,
)
from protocol.secagg import SecAggError

SECAGG_KEY = "secagg"
L2_CLIP_KEY = "secagg_l2_clip"
UNIT_WEIGHT_KEY = "secagg_unit_weight"
# How long a device that is done with its rounds still waits to be asked for its shares.
UNMASK_WAIT_S = 300.0


def is_secure(train_config: Mapping[str, object]) -> bool:
    return train_config.get(SECAGG_KEY) is True


class Trainer(Protocol):
    """What a secure round needs of ``LocalTrainer``: ``train`` and ``num_samples``."""

    @property
    def num_samples(self) -> int: ...

    def train(
        self, global_weights: Mapping[str, np.ndarray], round_number: int, settings: TrainSettings
    ) -> tuple[Arrays, dict[str, float]]: ...


@dataclass
class SecureRound:
    job: Job
    device: SecAggDevice
    # The last stage this device answered: keys, shares, (training), masked, revealed.
    stage: str = "keys"
    masked_at: float = 0.0


Masked = tuple[SecureRound, UpdateMeta, bytes]


class SecureRounds:
    def __init__(
        self,
        run_id: str,
        trainer: Trainer,
        defaults: TrainSettings,
        compute: SharedCompute | None = None,
    ) -> None:
        self.run_id, self.trainer, self.defaults = run_id, trainer, defaults
        self.compute = compute  # training slots shared with the process's other devices
        self.current: SecureRound | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="secure-train")
        self._pending: tuple[SecureRound, Future[tuple[UpdateMeta, bytes]]] | None = None
        # (round, attempt) -> the quantised update before masking, the latest ``keep``
        # (none by default: a model-sized copy each): it never leaves the device; tests
        # compare the server's unmasked sums with it.
        self.quantized: dict[tuple[int, int], np.ndarray] = {}
        self.keep = 0

    def start(self, job: Job, client_id: str) -> SecAggKeys:
        ann = job.announcement
        cfg = dict(ann.train_config)
        weight = 1 if cfg.get(UNIT_WEIGHT_KEY) is True else self.trainer.num_samples
        settings = self.defaults.with_overrides(cfg)
        clip = cfg.get(L2_CLIP_KEY)
        l2_clip = float(clip) if isinstance(clip, int | float) and not isinstance(clip, bool) else 0

        def train_delta(gw: Mapping[str, np.ndarray], rnd: int) -> tuple[Arrays, dict[str, float]]:
            trained, metrics = self.trainer.train(gw, rnd, settings)
            floats = {
                n: v for n, v in delta(trained, gw).items() if np.asarray(v).dtype.kind == "f"
            }
            if l2_clip > 0:
                # No noise here (z = 0): the worker adds it once to the unmasked mean.
                floats, norm = privatize_update(floats, l2_clip, 0.0, noise_generator(None))
                metrics["dp_norm"] = norm
                metrics["dp_clipped"] = float(norm > l2_clip)
            return floats, metrics

        device = SecAggDevice(self.run_id, client_id, weight, train_delta)
        self.current = SecureRound(job, device)
        return device.on_round(ann.round, job.attempt)

    def owes_shares(self, wait_s: float = UNMASK_WAIT_S) -> bool:
        """Whether the device sent its masked input and may still be asked to reveal (a
        device that leaves after its last round waits for that, at most ``wait_s``)."""
        cur = self.current
        return (
            cur is not None and cur.stage == "masked" and time.monotonic() - cur.masked_at < wait_s
        )

    def _mine(self, round_number: int | None, attempt: int) -> SecureRound | None:
        cur = self.current
        if cur is None or (cur.job.announcement.round, cur.job.attempt) != (round_number, attempt):
            return None
        return cur

    def on_roster(self, msg: SecAggRoster) -> SecAggShares | None:
        """None when the roster is of another round, or leaves this device out."""
        cur = self._mine(msg.round, msg.attempt)
        if cur is None or cur.stage != "keys" or cur.device.client_id not in msg.keys:
            return None
        shares = cur.device.on_roster(msg)
        cur.stage = "shares"
        return shares

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def on_inbox(self, msg: SecAggInbox) -> bool:
        """Start training and masking on the training thread; False when the inbox is not
        this device's current round's, or came twice."""
        cur = self._mine(msg.round, msg.attempt)
        if cur is None or cur.stage != "shares" or self._pending is not None:
            return False
        cur.stage = "training"
        self._pending = (cur, self._pool.submit(self._train, cur, msg))
        return True

    def _train(self, cur: SecureRound, msg: SecAggInbox) -> tuple[UpdateMeta, bytes]:
        """On the training thread: no I/O."""
        version = cur.job.announcement.model_version
        if self.compute is None:
            return cur.device.on_inbox(msg, cur.job.weights, version)
        # On the process's shared training threads, so that at most their number train.
        return self.compute.pool.submit(cur.device.on_inbox, msg, cur.job.weights, version).result()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the training to end; True once it has."""
        if self._pending is None:
            return False
        try:
            self._pending[1].exception(timeout)
        except TimeoutError:
            return False
        return True

    def collect(self) -> Masked | None:
        """The masked input once trained (None while it trains, or for a round that is no
        longer current); raises what training raised (``SecAggError`` among others)."""
        if self._pending is None or not self._pending[1].done():
            return None
        cur, future = self._pending
        self._pending = None
        try:
            meta, blob = future.result()
        except BaseException:
            cur.stage = "failed"
            raise
        if cur is not self.current:
            return None
        cur.stage, cur.masked_at = "masked", time.monotonic()
        if self.keep > 0 and cur.device.last_quantized is not None:
            key = (cur.job.announcement.round, cur.job.attempt)
            self.quantized[key] = cur.device.last_quantized
            while len(self.quantized) > self.keep:
                del self.quantized[next(iter(self.quantized))]
        return cur, meta, blob

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def on_unmask(self, msg: SecAggUnmask) -> SecAggReveal | None:
        cur = self._mine(msg.round, msg.attempt)
        if cur is None or cur.stage != "masked":
            return None
        if cur.device.client_id not in msg.survivors:
            raise SecAggError(
                f"round {msg.round}: the survivor list leaves this device out; revealing nothing"
            )
        reveal = cur.device.on_unmask(msg)
        cur.stage = "revealed"
        return reveal
