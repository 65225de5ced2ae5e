"""``SplitTrainer``: a device's SplitFed round behind the ``Trainer`` seam of the client.

The run's global model is the device-side part of a split model (head + tail parameters,
a normal codec blob), so the orchestrator and the aggregate task treat it like any model.
Each round the device loads the global head and tail, trains them with
``learning.split.train_split`` against the round's edge session (``round_session_id``:
run id, round and attempt, known from the announcement) over the device's own bus link, and
returns a normal ``LocalUpdate``: the delta of head + tail, encoded as ``LocalTrainer``
encodes it.
The body never reaches the device; the edge keeps it (``workers.edge.bodies``).

The link is a bus connection of the trainer's own: the client's loop owns its bus, and
training runs on the slot's thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from devices.config import DeviceConfig, TrainSettings
from devices.local import LocalTrainer, LocalUpdate
from devices.split import BusEdge
from learning.params import Arrays, load_numpy, to_numpy
from learning.replica import client_seed
from learning.split import split_model, train_split
from protocol.bus import Bus
from protocol.codec import spec_of
from protocol.split import round_session_id

# split requests carry fp32/bf16/fp16 only; lossier update encodings stay for the update
LINK_ENCODINGS = ("fp32", "bf16", "fp16")


class SplitTrainer(LocalTrainer):
    """``LocalTrainer`` whose model is trained split: head and tail here, body on the edge."""

    def __init__(
        self,
        base: LocalTrainer,
        run_id: str,
        bus: Callable[[], Bus],
        *,
        link_encoding: str = "bf16",
        pipeline: bool = False,
        timeout_s: float = 60.0,
    ) -> None:
        super().__init__(base.model, base.x, base.y, **base.rebuild_args())
        if link_encoding not in LINK_ENCODINGS:
            raise ValueError(f"link encoding {link_encoding!r}: one of {LINK_ENCODINGS}")
        self.split = split_model(self.model)
        self.device_names = set(self.split.state_names("head", "tail"))
        full = to_numpy(self.model)
        self.spec = spec_of({k: v for k, v in full.items() if k in self.device_names})
        self.run_id, self._connect = run_id, bus
        self.link_encoding, self.pipeline, self.timeout_s = link_encoding, pipeline, timeout_s
        self._bus: Bus | None = None
        self.link_bytes = 0
        # The registered identity; until then (a trainer used alone) "c<index>" and no token.
        self.client_id: str | None = None
        self.token: str | None = None
        self._attempt = 1  # of the round being trained (``step``)

    def bind_identity(self, client_id: str, token: str) -> None:
        self.client_id, self.token = client_id, token

    @classmethod
    def from_device_config(
        cls, config: DeviceConfig, bus: Callable[[], Bus], *, pipeline: bool = False
    ) -> SplitTrainer:
        link = config.training.encoding if config.training.encoding in LINK_ENCODINGS else "bf16"
        base = LocalTrainer.from_config(config)
        return cls(base, config.run_id, bus, link_encoding=link, pipeline=pipeline)

    def step(
        self,
        global_weights: Mapping[str, np.ndarray],
        model_version: int,
        round_number: int,
        settings: TrainSettings,
        *,
        attempt: int = 1,
    ) -> LocalUpdate:
        self._attempt = attempt  # names the attempt's edge session in ``train``
        return super().step(global_weights, model_version, round_number, settings, attempt=attempt)

    def warm_up(self, batch: int = 8) -> float:
        return 0.0  # a split step needs the edge; there is none before a round

    def train(
        self, global_weights: Mapping[str, np.ndarray], round_number: int, settings: TrainSettings
    ) -> tuple[Arrays, dict[str, float]]:
        """Train head and tail from the global ones against this round's edge session."""
        current = to_numpy(self.model)
        load_numpy(self.model, {**current, **global_weights})
        if self._bus is None:
            self._bus = self._connect()
        session = round_session_id(self.run_id, round_number, self._attempt)
        client = self.client_id or f"c{self.client_index}"
        with BusEdge(
            self._bus, session, client, run_id=self.run_id, token=self.token,
            encoding=self.link_encoding, timeout_s=self.timeout_s,
            # The session starts when the attempt opens, on a worker that may first have
            # to load torch and build the body: its queue may come a while after the model.
            connect_timeout_s=self.timeout_s,
        ) as link:  # fmt: skip
            result = train_split(
                self.split,
                link,
                self.x,
                self.y,
                epochs=settings.epochs,
                batch_size=settings.batch_size,
                lr=settings.lr,
                momentum=settings.momentum,
                weight_decay=settings.weight_decay,
                seed=client_seed(self.seed, round_number, self.client_index),
                pipeline=self.pipeline,
            )
        self.link_bytes += link.stats.bytes_sent + link.stats.bytes_received
        metrics = {
            "loss": float(result.loss),
            "accuracy": float(result.accuracy),
            "train_time_s": float(result.seconds),
            "split_bytes": float(link.stats.bytes_sent + link.stats.bytes_received),
        }
        trained = {k: v for k, v in to_numpy(self.model).items() if k in self.device_names}
        return trained, metrics
