"""The local step of a device: global weights in, an encoded delta blob out.

It follows ``learning.replica``'s seeding convention exactly: client k in round r trains with
``train_local(..., seed=client_seed(seed, r, k))`` from the round's global weights with a
fresh optimizer, so that a federation computes what the replica computes.

The update is a delta (``trained - global``) encoded against the announced model version
(header ``delta=True``, ``base_version=str(model_version)``). For the lossy encodings (int8,
top-k) the delta is first compensated with the residual that earlier rounds' encodings
dropped (error feedback), and the residual is updated from what the blob really carries.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from devices.config import DeviceConfig, TrainSettings
from learning.data import load_dataset, partition
from learning.feedback import ErrorFeedback
from learning.models import build_model
from learning.params import Arrays, delta, load_numpy, to_numpy
from learning.privacy import noise_generator, privatize_update
from learning.replica import client_seed
from learning.train import train_local
from protocol.codec import DecodeLimits, TensorSpec, decode, encode, spec_of


@dataclass(frozen=True)
class LocalUpdate:
    round: int
    base_version: int
    blob: bytes
    num_samples: int
    encoding: str
    metrics: dict[str, float]
    sent: Arrays | None = field(default=None, repr=False)  # what the blob decodes to, if known

    @property
    def sent_delta(self) -> Arrays:
        """What the blob decodes to (decoded now if the step had no need to)."""
        return self.sent if self.sent is not None else decode(self.blob).tensors


class LocalTrainer:
    """One device's model, data and error-feedback state; pure (no I/O but its inputs)."""

    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray,
        y: np.ndarray,
        *,
        client_index: int,
        seed: int = 0,
        encoding: str = "bf16",
        topk_fraction: float = 0.01,
        error_feedback: bool | None = None,
        limits: DecodeLimits | None = None,
    ) -> None:
        self.model, self.x, self.y = model, x, y
        self.client_index, self.seed = client_index, seed
        self.encoding, self.topk_fraction = encoding, topk_fraction
        lossy = encoding in ("int8", "topk")
        self.feedback = (
            ErrorFeedback() if (lossy if error_feedback is None else error_feedback) else None
        )
        self.limits = limits or DecodeLimits()
        self.spec: dict[str, TensorSpec] = spec_of(to_numpy(model))

    @classmethod
    def from_config(cls, config: DeviceConfig) -> LocalTrainer:
        """Load this device's own partition and build its model, as the replica does."""
        data = load_dataset(config.training.dataset, **config.training.dataset_args)
        parts = partition(
            config.training.partition,
            data.y_train,
            config.num_clients,
            seed=config.training.seed,
            **config.training.partition_args,
        )
        idx = parts[config.client_index]
        model = build_model(
            config.training.model,
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            seed=config.training.seed,
            **config.training.model_args,
        )
        return cls(
            model,
            data.x_train[idx],
            data.y_train[idx],
            client_index=config.client_index,
            seed=config.training.seed,
            encoding=config.training.encoding,
            topk_fraction=config.training.topk_fraction,
            limits=config.wire.decode_limits,
        )

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def rebuild_args(self) -> dict[str, Any]:
        """The keyword arguments (model and data aside) that build a trainer like this one:
        what a trainer of another kind made from it takes (``WasmTrainer``, ``SplitTrainer``)."""
        return {
            "client_index": self.client_index,
            "seed": self.seed,
            "encoding": self.encoding,
            "topk_fraction": self.topk_fraction,
            "error_feedback": self.feedback is not None,
            "limits": self.limits,
        }

    def bind_identity(self, client_id: str, token: str) -> None:
        """Told the device's client id and token once it registered (a trainer that speaks
        on the wire itself, like ``SplitTrainer``, signs its requests with them)."""

    def warm_up(self, batch: int = 8) -> float:
        """One training step on a few local samples, before the device says it is ready: a
        process's first step pays for torch's lazy initialisation (the optimizer's first
        step alone imports seconds of code on a busy machine), which would otherwise count
        as the first round's training time. Nothing that matters changes: every round
        loads the global weights and buffers and seeds its own randomness. Returns the
        seconds it took."""
        if self.num_samples == 0:
            return 0.0
        started = time.perf_counter()
        train_local(
            self.model,
            self.x[:batch],
            self.y[:batch],
            epochs=1,
            batch_size=batch,
            lr=0.0,
            momentum=0.9,
            seed=self.seed,
        )
        return time.perf_counter() - started

    def train(
        self, global_weights: Mapping[str, np.ndarray], round_number: int, settings: TrainSettings
    ) -> tuple[Arrays, dict[str, float]]:
        """Train from ``global_weights``; returns the trained weights and the metrics."""
        load_numpy(self.model, global_weights)
        result = train_local(
            self.model,
            self.x,
            self.y,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            proximal_mu=settings.proximal_mu,
            global_params=global_weights if settings.proximal_mu > 0 else None,
            seed=client_seed(self.seed, round_number, self.client_index),
        )
        metrics = {
            "loss": float(result.loss),
            "accuracy": float(result.accuracy),
            "train_time_s": float(result.seconds),
        }
        return to_numpy(self.model), metrics

    def encode_delta(
        self, d: Mapping[str, np.ndarray], base_version: int
    ) -> tuple[bytes, Arrays | None]:
        """Encode ``d`` as a delta against ``base_version`` (with error feedback when lossy);
        returns the blob and, with error feedback (which needs it), what it decodes to."""
        to_send = self.feedback.compensate(d) if self.feedback is not None else dict(d)
        # A zero base makes the stored values exactly ``to_send`` while the header still says
        # "delta against base_version" (encode computes tensors - base).
        zeros = {n: np.zeros_like(np.asarray(v)) for n, v in to_send.items()}
        blob = encode(
            to_send,
            self.encoding,
            base=zeros,
            base_version=str(base_version),
            topk_fraction=self.topk_fraction,
        )
        if self.feedback is None:
            return blob, None  # the ingest decodes and checks it; decoding here cost 0.6 ms
        sent = decode(blob, limits=self.limits, expected=self.spec).tensors
        self.feedback.update(sent)
        return blob, sent

    def step(
        self,
        global_weights: Mapping[str, np.ndarray],
        model_version: int,
        round_number: int,
        settings: TrainSettings,
        *,
        attempt: int = 1,
    ) -> LocalUpdate:
        """Train and encode the update; ``attempt``: the round attempt it is for (a split
        trainer's edge session is the attempt's)."""
        started = time.perf_counter()
        trained, metrics = self.train(global_weights, round_number, settings)
        d = delta(trained, global_weights)
        if settings.privacy is not None:
            d = self.privatize(d, round_number, settings, metrics)
        blob, sent = self.encode_delta(d, model_version)
        metrics["step_time_s"] = time.perf_counter() - started
        return LocalUpdate(
            round=round_number,
            base_version=model_version,
            blob=blob,
            num_samples=self.num_samples,
            encoding=self.encoding,
            metrics=metrics,
            sent=sent,
        )

    def privatize(
        self, d: Arrays, round_number: int, settings: TrainSettings, metrics: dict[str, float]
    ) -> Arrays:
        """Local DP: clip the delta and add Gaussian noise before it is encoded (see
        ``learning.privacy.mechanism``; seeded per device and round when the run is)."""
        dp = settings.privacy
        assert dp is not None
        rng = noise_generator(dp.seed, "local", self.seed, self.client_index, round_number)
        floats = {n: v for n, v in d.items() if np.asarray(v).dtype.kind == "f"}
        noised, norm = privatize_update(floats, dp.clip_norm, dp.noise_multiplier, rng)
        metrics["dp_norm"] = norm
        metrics["dp_clipped"] = float(norm > dp.clip_norm)
        return {**d, **noised}

    def residual_norm(self) -> float:
        return self.feedback.residual_norm() if self.feedback is not None else 0.0


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics that JSON can carry (NaN/Inf dropped)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
    }
