"""``FlowerTrainer``: an unmodified Flower client as a fedmq device's trainer
(``fedmq device --flower-client package.module:object``).

The client is whatever a Flower user points ``flwr run`` at, or hands to ``start_client``:

- a ``flwr.clientapp.ClientApp`` built with ``client_fn`` (the ``NumPyClient`` quickstart),
  or one with ``@app.train()`` / ``@app.evaluate()`` functions (the Message API);
- a ``client_fn(context)`` returning a ``Client`` or ``NumPyClient``;
- a ``NumPyClient`` or ``Client`` instance.

All of them run through ``ClientApp.__call__`` with the messages a SuperNode would hand it,
so Flower's own code decides how a ``NumPyClient`` is called. The round's global model goes
in; the arrays that come back become fedmq's update exactly as a native device's do
(``LocalTrainer.step``: the delta against the announced version, error feedback for the
lossy encodings, the encoding). Nothing else changes on the wire: the orchestrator cannot
tell a Flower device from a native one.

Arrays: a ``NumPyClient`` sees the run model's state dict as a list in its order (what
``[v.numpy() for v in net.state_dict().values()]`` gives back); an ``ArrayRecord`` carries
the run model's names (the ServerApp's ``ArrayRecord(net.state_dict())``). What comes back
is matched by name when the names are the run model's, else by position, and its shapes
and count are checked either way.

Config (``fit``'s ``config``, the ``"config"`` ``ConfigRecord``): the device's effective
training settings under Flower's names (``local-epochs``, ``lr``, ``momentum``,
``batch-size``, ``weight-decay``, ``proximal-mu``), then the round's announced
``train_config`` as the run sets it (strategy values such as FedProx's ``proximal_mu``
included), then ``server-round``. The ``Context``'s ``run_config`` holds the same but the
round; its ``node_config`` is Flower simulation's ``partition-id`` / ``num-partitions``
(this device's k and K) and ``partition-seed`` (the seed fedmq's devices cut their
partitions with); its ``state`` persists across rounds.

Metrics: the client's fit metrics travel with the update (numbers only, names up to 64
characters), and ``loss``/``accuracy`` are filled from ``train_loss``/``train_accuracy``
when the client names them so, which is what the dashboard shows. With ``evaluate`` on (the
default, as Flower's strategies evaluate every round) a client that implements evaluation
is asked, before it trains, to evaluate the global model it was sent: its results travel as
``eval_loss`` and ``eval_<metric>``, with ``eval_time_s`` (``train_time_s`` is ``fit``'s).

flwr is imported here only, and only when a trainer is built: fedmq's packages never import
it (tests/unit/test_flower_optional.py), and it is an optional extra (``fedmq[flower]``).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from devices.config import DeviceConfig, TrainSettings
from devices.local import LocalTrainer, finite_metrics
from learning.data import load_dataset
from learning.models import build_model
from learning.params import Arrays
from learning.replica import client_seed

if TYPE_CHECKING:
    from flwr.app import Context, Message, RecordDict
    from flwr.clientapp import ClientApp

MAX_METRICS = 32  # a client's metrics beyond these are dropped (the envelope stays small)
_ALIASES = {"loss": ("train_loss",), "accuracy": ("train_accuracy", "train_acc", "acc")}
_SETTINGS_NAMES = {
    "local-epochs": "epochs",
    "lr": "lr",
    "momentum": "momentum",
    "batch-size": "batch_size",
    "weight-decay": "weight_decay",
    "proximal-mu": "proximal_mu",
}


class FlowerError(ValueError):
    """The Flower client cannot be loaded, or what it returned does not fit the run."""


def load_client_app(target: str | object) -> ClientApp:
    """The ``ClientApp`` that ``target`` is, or that wraps it: ``"package.module:object"``
    (the current directory is importable, as for ``flwr run``) or the object itself."""
    try:
        from flwr.client import Client, NumPyClient
        from flwr.clientapp import ClientApp
    except ImportError as e:
        raise FlowerError(f"a Flower client needs flwr: pip install 'fedmq[flower]' ({e})") from e

    obj = _import_object(target) if isinstance(target, str) else target
    if isinstance(obj, ClientApp):
        return obj
    if isinstance(obj, NumPyClient):
        client = obj.to_client()
        return ClientApp(client_fn=lambda context: client)
    if isinstance(obj, Client):
        return ClientApp(client_fn=lambda context: obj)
    if callable(obj):  # a client_fn(context)
        return ClientApp(client_fn=obj)
    raise FlowerError(
        f"{target!r} is a {type(obj).__name__}: expected a ClientApp, a NumPyClient, "
        "a Client or a client_fn(context)"
    )


def _import_object(target: str) -> object:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise FlowerError(f"--flower-client {target!r}: expected package.module:object")
    if os.getcwd() not in sys.path:  # `flwr run .` imports the app from its directory too
        sys.path.insert(0, os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as e:
        raise FlowerError(f"--flower-client {target!r}: cannot import {module_name}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FlowerError(f"--flower-client {target!r}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    return obj


class FlowerTrainer(LocalTrainer):
    """``LocalTrainer`` whose training is the Flower client's ``fit`` (or ``train``)."""

    def __init__(
        self,
        model: nn.Module,
        app: ClientApp,
        *,
        run_id: str,
        num_clients: int,
        client_index: int,
        evaluate: bool = True,
        **kwargs: Any,
    ) -> None:
        empty = np.zeros((0,), dtype=np.float32)
        super().__init__(model, empty, empty, client_index=client_index, **kwargs)
        from flwr.app import Context, RecordDict

        self.app = app
        self.names = list(self.spec)
        self.run_id = run_id
        self.evaluate = evaluate
        # A ClientApp made from a client_fn speaks the legacy FitIns/FitRes records.
        self.legacy = getattr(app, "_call", None) is not None
        self._flwr_run_id = zlib.crc32(run_id.encode())
        self.context: Context = Context(
            run_id=self._flwr_run_id,
            node_id=zlib.crc32(f"{run_id}:{client_index}".encode()),
            node_config={
                "partition-id": client_index,
                "num-partitions": num_clients,
                "partition-seed": self.seed,
            },
            state=RecordDict(),
            run_config={},
        )
        self._examples = 0
        self._messages = 0

    @classmethod
    def from_config(cls, config: DeviceConfig) -> FlowerTrainer:
        """The run's model (for its names and shapes; the client holds its own copy) and
        the Flower client named by ``config.training.flower_client``."""
        if config.training.flower_client is None:
            raise FlowerError("TrainingConfig.flower_client is not set")
        return cls.from_app(load_client_app(config.training.flower_client), config)

    @classmethod
    def from_app(cls, app: ClientApp | object, config: DeviceConfig) -> FlowerTrainer:
        """The SDK's way in: a Flower client object (see ``load_client_app``) for ``config``."""
        data = load_dataset(config.training.dataset, **config.training.dataset_args)
        model = build_model(
            config.training.model,
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            seed=config.training.seed,
            **config.training.model_args,
        )
        return cls(
            model,
            load_client_app(app),
            run_id=config.run_id,
            num_clients=config.num_clients,
            client_index=config.client_index,
            seed=config.training.seed,
            encoding=config.training.encoding,
            topk_fraction=config.training.topk_fraction,
            limits=config.wire.decode_limits,
        )

    @property
    def num_samples(self) -> int:
        """What the client's last ``fit`` said it trained on; 1 until it first trains (the
        device loop asks before every round whether there is anything to train on, and a
        Flower client says so only by training)."""
        return self._examples or 1

    def warm_up(self, batch: int = 8) -> float:
        """A Flower client loads its data and model in ``client_fn`` or in its train
        function, every round: there is nothing to warm up from outside."""
        return 0.0

    def train(
        self, global_weights: Mapping[str, np.ndarray], round_number: int, settings: TrainSettings
    ) -> tuple[Arrays, dict[str, float]]:
        config = self.flower_config(settings, round_number)
        self.context.run_config = {k: v for k, v in config.items() if k != "server-round"}
        arrays = [np.asarray(global_weights[n]) for n in self.names]
        metrics: dict[str, float] = {}
        if self.evaluate:
            started = time.perf_counter()
            metrics.update(self._evaluate(arrays, config, round_number))
            if metrics:
                metrics["eval_time_s"] = time.perf_counter() - started
        started = time.perf_counter()
        # Flower leaves shuffling to the client's own DataLoader (torch's global RNG);
        # seeding it per (seed, round, device) as native devices seed theirs makes a run
        # repeatable where the client does not seed itself.
        # (The CPU generator only: torch.manual_seed would also seed CUDA, see train_local.)
        torch.default_generator.manual_seed(client_seed(self.seed, round_number, self.client_index))
        trained, examples, fit_metrics = self._fit(arrays, config, round_number)
        self._examples = examples
        metrics.update(_fit_metrics(fit_metrics))
        metrics["train_time_s"] = time.perf_counter() - started
        return trained, metrics

    def flower_config(self, settings: TrainSettings, round_number: int) -> dict[str, Any]:
        """The config a Flower client's ``fit`` receives in this round (module docstring)."""
        config: dict[str, Any] = {k: getattr(settings, f) for k, f in _SETTINGS_NAMES.items()}
        for key, value in settings.train_config.items():
            if _config_value(value):
                config[str(key)] = list(value) if isinstance(value, list | tuple) else value
        config["server-round"] = round_number
        return config

    # --- the two message formats ------------------------------------------------------

    def _fit(
        self, arrays: list[np.ndarray], config: dict[str, Any], round_number: int
    ) -> tuple[Arrays, int, Mapping[str, Any]]:
        from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

        if self.legacy:
            from flwr.common import Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
            from flwr.compat.common.recorddict_compat import (
                fitins_to_recorddict,
                recorddict_to_fitres,
            )

            fit_ins = FitIns(ndarrays_to_parameters(arrays), config)
            reply = self._call(
                MessageType.TRAIN, fitins_to_recorddict(fit_ins, keep_input=True), round_number
            )
            res = recorddict_to_fitres(reply, keep_input=False)
            if res.status.code != Code.OK:
                raise FlowerError(f"the client's fit failed: {res.status.message}")
            trained = self._by_position(parameters_to_ndarrays(res.parameters))
            return trained, int(res.num_examples), res.metrics
        content = RecordDict({"arrays": self._array_record(arrays), "config": ConfigRecord(config)})
        reply = self._call(MessageType.TRAIN, content, round_number)
        returned = reply.get("arrays")
        if not isinstance(returned, ArrayRecord):
            raise FlowerError("the ClientApp's train reply has no ArrayRecord under 'arrays'")
        metrics = dict(reply.get("metrics") or {})
        examples = metrics.get("num-examples")
        if not isinstance(examples, int | float) or examples < 1:
            raise FlowerError(
                "the ClientApp's train reply must say how many examples it trained on: "
                "MetricRecord 'num-examples' (what Flower's FedAvg weights by)"
            )
        return self._from_record(returned), int(examples), metrics

    def _evaluate(
        self, arrays: list[np.ndarray], config: dict[str, Any], round_number: int
    ) -> dict[str, float]:
        """The client's evaluation of the global model it was sent; {} where it has none."""
        from flwr.app import ConfigRecord, MessageType, RecordDict

        if self.legacy:
            from flwr.common import Code, EvaluateIns, ndarrays_to_parameters
            from flwr.compat.common.recorddict_compat import (
                evaluateins_to_recorddict,
                recorddict_to_evaluateres,
            )

            ins = EvaluateIns(ndarrays_to_parameters(arrays), config)
            reply = self._call(
                MessageType.EVALUATE, evaluateins_to_recorddict(ins, keep_input=True), round_number
            )
            res = recorddict_to_evaluateres(reply)
            if res.status.code == Code.EVALUATE_NOT_IMPLEMENTED:
                self.evaluate = False  # it will not start to implement it next round
                return {}
            if res.status.code != Code.OK:
                raise FlowerError(f"the client's evaluate failed: {res.status.message}")
            out = {"eval_loss": float(res.loss), "eval_num_examples": float(res.num_examples)}
            return {**out, **_prefixed("eval_", res.metrics)}
        if "evaluate.default" not in getattr(self.app, "_registered_funcs", {}):
            self.evaluate = False
            return {}
        content = RecordDict({"arrays": self._array_record(arrays), "config": ConfigRecord(config)})
        reply = self._call(MessageType.EVALUATE, content, round_number)
        return _prefixed("eval_", dict(reply.get("metrics") or {}))

    def _call(self, message_type: str, content: RecordDict, round_number: int) -> RecordDict:
        """``content`` to the ClientApp as the SuperNode hands it a message; its reply's."""
        from flwr.app import DEFAULT_TTL, Message, Metadata

        self._messages += 1
        metadata = Metadata(
            run_id=self._flwr_run_id,
            message_id=f"{self.run_id}:{self.client_index}:{self._messages}",
            src_node_id=1,  # the SuperLink's node id in Flower
            dst_node_id=self.context.node_id,
            reply_to_message_id="",
            group_id=str(round_number),
            created_at=time.time(),
            ttl=DEFAULT_TTL,
            message_type=message_type,
        )
        # Received messages are built from their metadata, as the SuperNode builds them;
        # Message's typed overloads are for messages a ServerApp creates (which need the
        # process-wide TaskIdentity of a running Flower app).
        build: Any = Message
        reply: Message = self.app(build(content=content, metadata=metadata), self.context)
        if reply.has_error():
            raise FlowerError(f"the ClientApp's {message_type} failed: {reply.error.reason}")
        return reply.content

    # --- arrays --------------------------------------------------------------------------

    def _array_record(self, arrays: list[np.ndarray]) -> Any:
        from flwr.app import Array, ArrayRecord

        return ArrayRecord({n: Array(a) for n, a in zip(self.names, arrays, strict=True)})

    def _from_record(self, record: Any) -> Arrays:
        if list(record.keys()) == self.names:
            return self._by_position([record[n].numpy() for n in self.names])
        return self._by_position(record.to_numpy_ndarrays())

    def _by_position(self, arrays: Sequence[np.ndarray]) -> Arrays:
        """The client's arrays under the run model's names, in its state-dict order."""
        if len(arrays) != len(self.names):
            raise FlowerError(
                f"the client returned {len(arrays)} arrays; the run's model has "
                f"{len(self.names)} ({', '.join(self.names)})"
            )
        out: Arrays = {}
        for name, a in zip(self.names, arrays, strict=True):
            spec = self.spec[name]
            a = np.asarray(a)
            if tuple(a.shape) != tuple(spec.shape):
                raise FlowerError(
                    f"array {len(out)} ({name}): the client returned shape {a.shape}, "
                    f"the run's model has {tuple(spec.shape)}"
                )
            out[name] = a.astype(spec.dtype, copy=False)
        return out


def _config_value(value: object) -> bool:
    """What a ``ConfigRecord`` (and Flower's ``Scalar``) holds: no None, no nesting."""
    scalar = (bool, int, float, str, bytes)
    if isinstance(value, list | tuple):
        return bool(value) and all(isinstance(v, scalar) for v in value)
    return isinstance(value, scalar)


def _fit_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = _prefixed("", metrics)
    for name, aliases in _ALIASES.items():
        for alias in aliases:
            if name not in out and alias in out:
                out[name] = out[alias]
    return out


def _prefixed(prefix: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    numbers = finite_metrics({f"{prefix}{k}": v for k, v in metrics.items()})
    return {k: v for k, v in list(numbers.items())[:MAX_METRICS] if len(k) <= 64}
