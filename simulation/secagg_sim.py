"""``fedmq simulate --secagg``: SecAgg+ rounds on digits, embedded, with dropouts.

One process plays every part over real wire messages (each one encoded and parsed back
with the strict validation of ``protocol.messages``): the orchestrator's SecAgg sub-state
machine (``orchestrator.state.secagg``) decides each stage, devices
(``devices.secagg.SecAggDevice``) train and mask, the blob store holds only masked blobs,
and the worker's ``unmask_mean`` recovers the survivors' weighted mean for FedAvg's step.
Devices drop on a seeded schedule: some before they share keys, a fraction after they
sent their masked input (they never answer the unmasking request).

What this does not do yet: run through the orchestrator service, the database and the
AMQP/HTTP transports (``SimOptions`` runs do); the sub-state machine is not yet persisted
with the round (docs/architecture.md, "SecAgg+ as a pure protocol package").
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from devices.config import TrainSettings
from devices.local import LocalTrainer
from devices.secagg import SecAggDevice, float_layout
from learning.data import load_dataset, partition
from learning.evaluate import evaluate
from learning.models import build_model
from learning.params import Arrays, delta, load_numpy, to_numpy
from orchestrator.state import secagg as sm
from protocol import codec
from protocol.messages import (
    Envelope,
    SecAggInbox,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
    UpdateMeta,
    encode_message,
    parse_message,
)
from protocol.secagg import SecAggConfig, SecAggError
from workers.tasks.secagg import fedavg_step, unmask_mean


@dataclass(frozen=True)
class SecAggSimOptions:
    clients: int = 10
    rounds: int = 3
    secure: bool = True  # False: the same federation in the clear (the benchmark's baseline)
    drop_after: float = 0.3  # share of the selected that vanish after sending masked input
    drop_before: int = 0  # devices per round that vanish before sharing keys
    dataset: str = "digits"
    model: str = "mlp"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    config: SecAggConfig = field(default_factory=SecAggConfig)


@dataclass
class RoundOutcome:
    round: int
    survivors: tuple[str, ...]
    dropped_before: tuple[str, ...]
    dropped_after: tuple[str, ...]
    accuracy: float
    seconds: float
    bytes_up: int
    bytes_down: int
    scale: int = 0
    base: Arrays = field(default_factory=dict, repr=False)
    model: Arrays = field(default_factory=dict, repr=False)
    failure: str | None = None


class SecAggFederation:
    """K devices and the server parts, in process; ``round()`` runs one."""

    def __init__(self, o: SecAggSimOptions, run_id: str = "secagg-sim") -> None:
        self.o, self.run_id = o, run_id
        data = load_dataset(o.dataset)
        parts = partition("iid", data.y_train, o.clients, seed=o.seed)
        self.model = build_model(
            o.model, num_classes=data.num_classes, input_shape=data.input_shape, seed=o.seed
        )
        self.x_test, self.y_test = data.x_test, data.y_test
        self.weights: Arrays = to_numpy(self.model)
        self.version = 0
        self.settings = TrainSettings(epochs=o.epochs, lr=o.lr, batch_size=o.batch_size)
        self.trainers = {}
        self.devices: dict[str, SecAggDevice] = {}
        for k, idx in enumerate(parts):
            cid = f"dev{k:03d}"
            m = build_model(
                o.model, num_classes=data.num_classes, input_shape=data.input_shape, seed=o.seed
            )
            t = LocalTrainer(
                m,
                data.x_train[idx],
                data.y_train[idx],
                client_index=k,
                seed=o.seed,
                encoding="fp32",
            )
            self.trainers[cid] = t
            self.devices[cid] = SecAggDevice(run_id, cid, t.num_samples, self._train_fn(t))
        self.blobs: dict[str, bytes] = {}  # the blob store: sha256 -> bytes
        self.bytes_up = self.bytes_down = 0

    def _train_fn(self, t: LocalTrainer) -> Any:
        def train(gw: Mapping[str, np.ndarray], rnd: int) -> tuple[Arrays, dict[str, float]]:
            trained, metrics = t.train(gw, rnd, self.settings)
            d = delta(trained, gw)
            return {n: v for n, v in d.items() if np.asarray(v).dtype.kind == "f"}, metrics

        return train

    def _up(self, msg: Envelope) -> Any:
        raw = encode_message(msg)
        self.bytes_up += len(raw)
        return parse_message(raw)

    def _down(self, msg: Envelope, copies: int = 1) -> Any:
        raw = encode_message(msg)
        self.bytes_down += len(raw) * copies
        return parse_message(raw)

    def _schedule(self, number: int) -> tuple[set[str], set[str]]:
        rng = np.random.default_rng([self.o.seed, number])
        ids = sorted(self.devices)
        order = [ids[i] for i in rng.permutation(len(ids))]
        before = set(order[: self.o.drop_before])
        after_n = math.floor(self.o.drop_after * len(ids) + 1e-9)
        after = set(order[self.o.drop_before : self.o.drop_before + after_n])
        return before, after

    def round(self, number: int) -> RoundOutcome:
        started = time.perf_counter()
        self.bytes_up = self.bytes_down = 0
        base = {n: v.copy() for n, v in self.weights.items()}
        model_blob = codec.encode(base, codec.Encoding.FP32)
        self.bytes_down += len(model_blob) * len(self.devices)  # the global model, to each
        before, after = self._schedule(number)
        if self.o.secure:
            out = self._secure_round(number, base, before, after)
        else:
            out = self._plain_round(number, base, before)  # the rest's updates arrived
        out.seconds = time.perf_counter() - started
        out.bytes_up, out.bytes_down = self.bytes_up, self.bytes_down
        out.base = base
        if out.failure is None:
            self.weights = out.model
            self.version += 1
        load_numpy(self.model, self.weights)
        out.accuracy = evaluate(self.model, self.x_test, self.y_test)[1]
        return out

    def _plain_round(self, number: int, base: Arrays, gone: set[str]) -> RoundOutcome:
        total: dict[str, np.ndarray] = {}
        samples = 0
        alive = [c for c in sorted(self.devices) if c not in gone]
        for cid in alive:
            d, _ = self.devices[cid].train_delta(base, number)
            blob = codec.encode(d, codec.Encoding.FP32)
            self.bytes_up += len(blob)
            got = codec.decode(blob).tensors
            n = self.trainers[cid].num_samples
            samples += n
            for k, v in got.items():
                total[k] = total.get(k, 0.0) + n * v.astype(np.float64)
        mean = {k: (v / samples).astype(np.float32) for k, v in total.items()}
        return RoundOutcome(
            number,
            tuple(alive),
            (),
            tuple(sorted(gone)),
            0.0,
            0.0,
            0,
            0,
            model=fedavg_step(base, mean),
        )

    def _secure_round(  # noqa: C901 - one arm per stage effect, in order
        self, number: int, base: Arrays, before: set[str], after: set[str]
    ) -> RoundOutcome:
        o, devs = self.o, self.devices
        now = 0.0
        r = sm.start(
            self.run_id,
            number,
            1,
            tuple(devs),
            o.config,
            secrets.token_hex(32),
            now=now,
            stage_s=60.0,
        )
        effects: list[sm.SecAggEffect] = []

        def feed(ev: sm.SecAggInput) -> None:
            nonlocal r
            r, eff = sm.step(r, ev, now)
            refused = [e for e in eff if isinstance(e, sm.SecAggRefused)]
            if refused:
                raise SecAggError(refused[0].reason)
            effects.extend(eff)

        for cid in sorted(devs):  # stage 1
            k: SecAggKeys = self._up(devs[cid].on_round(number))
            feed(sm.KeysIn(cid, sm.Keys(k.keys.c_pub, k.keys.s_pub, k.keys.num_samples)))
        for cid in sorted(before):  # they vanish before sharing keys
            feed(sm.DeviceLost(cid))
        while effects:
            e = effects.pop(0)
            if isinstance(e, sm.SendRoster):
                roster = self._down(self._roster(number, e), copies=len(e.to))
                for cid in (c for c in e.to if c not in before):
                    sh: SecAggShares = self._up(devs[cid].on_roster(roster))
                    feed(sm.SharesIn(cid, sh.boxes))
            elif isinstance(e, sm.SendInbox):
                inbox = self._down(
                    SecAggInbox(
                        run_id=self.run_id, client_id=e.to, round=number, boxes=dict(e.boxes)
                    )
                )
                meta, blob = devs[e.to].on_inbox(inbox, base, self.version)
                meta = self._up(meta)
                self.bytes_up += len(blob)
                self._store(meta, blob)
                feed(sm.MaskedInput(e.to, meta.blob_sha256, meta.num_samples))
                if e.to in after:
                    feed(sm.DeviceLost(e.to))  # gone after its masked input
            elif isinstance(e, sm.RequestUnmask):
                req = self._down(
                    SecAggUnmask(
                        run_id=self.run_id,
                        round=number,
                        survivors=list(e.survivors),
                        dropped=list(e.dropped),
                    ),
                    copies=len(e.to),
                )
                for cid in (c for c in e.to if c not in after):  # the vanished never answer
                    rv: SecAggReveal = self._up(devs[cid].on_unmask(req))
                    feed(sm.RevealIn(cid, {o: (s.kind, s.share) for o, s in rv.shares.items()}))
            elif isinstance(e, sm.SecAggFailed):
                return self._failed(number, before, after, e.reason)
            elif isinstance(e, sm.Unmasked):
                layout = float_layout(base)
                mean, _ = unmask_mean(e.material, self.blobs.__getitem__, layout)
                return RoundOutcome(
                    number,
                    tuple(sorted(e.material["masked"])),
                    tuple(sorted(before)),
                    tuple(sorted(after)),
                    0.0,
                    0.0,
                    0,
                    0,
                    scale=int(e.material["scale"]),
                    model=fedavg_step(base, mean),
                )
        return self._failed(number, before, after, "the stages ended without a result")

    def _failed(self, number: int, before: set[str], after: set[str], why: str) -> RoundOutcome:
        return RoundOutcome(
            number, (), tuple(sorted(before)), tuple(sorted(after)), 0.0, 0.0, 0, 0, failure=why
        )

    def _roster(self, number: int, e: sm.SendRoster) -> SecAggRoster:
        return SecAggRoster.model_validate({"run_id": self.run_id, "round": number, **e.fields()})

    def _store(self, meta: UpdateMeta, blob: bytes) -> None:
        if hashlib.sha256(blob).hexdigest() != meta.blob_sha256:
            raise SecAggError("a masked blob does not match its meta")
        self.blobs[meta.blob_sha256] = blob


def run(o: SecAggSimOptions) -> list[RoundOutcome]:
    fed = SecAggFederation(o)
    return [fed.round(n) for n in range(1, o.rounds + 1)]
