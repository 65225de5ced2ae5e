"""What one device needs to know: its run, its broker, its own data and how to train.

``DeviceConfig`` names the run and the device's partition and holds three parts:
``WireConfig`` (how it reaches the platform), ``TrainingConfig`` (what it trains and how)
and ``SimulatedBehaviour`` (the heterogeneity a fleet simulates; all off for a real device).

A device loads its partition locally (data never travels): ``load_dataset(dataset,
**dataset_args)`` then ``partition(partition, y_train, num_clients, seed=seed,
**partition_args)[client_index]``, exactly as ``learning.replica`` does, so that a
federation of K devices trains what the replica trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from learning.privacy import LocalPrivacy
from protocol.bus import BusConfig
from protocol.chunking import DEFAULT_CHUNK_SIZE
from protocol.codec import DecodeLimits, Encoding
from protocol.signing import SignatureError, decode_public_key

LOSSY_ENCODINGS = frozenset({Encoding.INT8.value, Encoding.TOPK.value})


# train_config key -> TrainSettings field (``local_epochs``, ``batch``, ``mu`` are aliases).
TRAIN_CONFIG_KEYS = {
    "epochs": "epochs",
    "local_epochs": "epochs",
    "lr": "lr",
    "momentum": "momentum",
    "batch_size": "batch_size",
    "batch": "batch_size",
    "weight_decay": "weight_decay",
    "proximal_mu": "proximal_mu",
    "mu": "proximal_mu",
}


@dataclass(frozen=True)
class TrainSettings:
    """Local training hyper-parameters; a round's ``train_config`` may override them."""

    epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    # Local DP (the run's privacy block in local mode, sent as train_config["privacy"]).
    privacy: LocalPrivacy | None = None
    # The round's train_config as announced, for a trainer that hands it on whole (a Flower
    # client's fit config, devices/flower.py); the fields above are what fedmq reads of it.
    train_config: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def with_overrides(self, train_config: dict[str, Any]) -> TrainSettings:
        """These settings with the known keys of ``train_config`` applied (others ignored).
        Malformed DP keys (``dp_clip_norm`` ...) raise PrivacyError: a device must not send
        its update without the noise the run asked for."""
        values: dict[str, Any] = {
            "epochs": self.epochs,
            "lr": self.lr,
            "momentum": self.momentum,
            "batch_size": self.batch_size,
            "weight_decay": self.weight_decay,
            "proximal_mu": self.proximal_mu,
            "privacy": self.privacy,
        }
        local_dp = LocalPrivacy.from_train(train_config)
        if local_dp is not None:
            values["privacy"] = local_dp
        for key, name in TRAIN_CONFIG_KEYS.items():
            value = train_config.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            values[name] = int(value) if name in ("epochs", "batch_size") else float(value)
        return TrainSettings(**values, train_config=dict(train_config))


@dataclass(frozen=True)
class WireConfig:
    """How the device reaches the platform: broker or gateway, its identity and timings."""

    broker_url: str = "memory://"
    transport: Literal["amqp", "http"] = "amqp"  # amqp: the bus at broker_url (or memory://)
    gateway_url: str | None = None  # the REST gateway, for transport "http"
    heartbeat_s: float = 5.0
    poll_s: float = 0.1  # longest wait on the device queue between heartbeat checks
    register_timeout_s: float = 30.0  # per attempt; registration is retried until stopped
    model_wait_s: float = 60.0  # how long a selected device waits for its model's chunks
    rejoin_after_stall_s: float = 30.0  # a bus call this slow: signal join+ready again
    # After its last round (DeviceConfig.stop_after_rounds), how long the device waits for
    # its last update's accepted/rejected before it leaves.
    answer_wait_s: float = 30.0
    keep_models: int = 2  # global model versions held (the newest by number)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # Also signal training/update/finish: the orchestrator moves the client through these
    # itself and may refuse (dead-letter) them when they race its moves; see devices/client.py.
    progress_signals: bool = False
    bus: BusConfig = field(default_factory=BusConfig)
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits)
    device_info: dict[str, Any] = field(default_factory=dict)  # sent with the registration
    # Where the device keeps its client id and token (devices/identity.py): a restart
    # resumes as the same client instead of registering anew. None: nothing is kept.
    identity_file: Path | None = None
    # The orchestrator's Ed25519 public key (base64), when known beforehand (``fedmq
    # orchestrator`` logs it): the registration reply must carry this key. None: the device
    # trusts the key of the first good reply and pins it (trust on first use).
    orchestrator_key: str | None = None

    def __post_init__(self) -> None:
        if self.transport == "http" and not self.gateway_url:
            raise ValueError("transport http needs gateway_url")
        if self.heartbeat_s <= 0 or self.poll_s <= 0:
            raise ValueError("heartbeat_s and poll_s must be positive")
        if self.orchestrator_key is not None:
            try:
                decode_public_key(self.orchestrator_key)
            except SignatureError as e:
                raise ValueError(f"orchestrator_key: {e}") from None


@dataclass(frozen=True)
class TrainingConfig:
    """What the device trains and how: its data, model, hyper-parameters and encoding."""

    dataset: str = "digits"
    dataset_args: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"
    model_args: dict[str, Any] = field(default_factory=dict)
    partition: str = "iid"
    partition_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    defaults: TrainSettings = field(default_factory=TrainSettings)  # before train_config
    encoding: str = Encoding.BF16.value
    topk_fraction: float = 0.01
    torch_threads: int | None = 1  # set by run_device (a process per device); None: leave
    runtime: Literal["torch", "wasm"] = "torch"  # wasm: train in devices/wasm (MLPs only)
    # "package.module:object": train with this Flower client instead (devices/flower.py)
    flower_client: str | None = None
    warm_up: bool = True  # one forward/backward pass before registering (see LocalTrainer)

    def __post_init__(self) -> None:
        Encoding(self.encoding)  # raises ValueError for an unknown encoding
        if not 0 < self.topk_fraction <= 1:
            raise ValueError(f"topk_fraction {self.topk_fraction} must be in (0, 1]")
        if self.runtime not in ("torch", "wasm"):
            raise ValueError(f"runtime {self.runtime!r} must be torch or wasm")
        if self.flower_client is not None and self.runtime != "torch":
            raise ValueError("a Flower client trains with its own code: runtime must be torch")

    @property
    def lossy(self) -> bool:
        """int8 and top-k drop information: their updates use error feedback."""
        return self.encoding in LOSSY_ENCODINGS


@dataclass(frozen=True)
class SimulatedBehaviour:
    """Simulated heterogeneity (fleets and tests; all off for a real device)."""

    slowdown_s: float = 0.0  # extra seconds each local training takes (a slow device)
    dropout: float = 0.0  # chance per selected round that the device vanishes for it ...
    outage_s: float = 10.0  # ... for this long (at most until the round's deadline)
    join_delay_s: float = 0.0  # a late joiner: seconds before it registers

    def __post_init__(self) -> None:
        if self.slowdown_s < 0 or self.join_delay_s < 0 or self.outage_s < 0:
            raise ValueError("slowdown_s, join_delay_s and outage_s must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class DeviceConfig:
    """One device: which run and partition it is, and its three parts. Built from the
    settings by ``fedmq.wiring.device_config``; tests and the SDK name only the parts they
    change."""

    run_id: str
    client_index: int  # k, 0-based: which partition this device holds
    num_clients: int  # K: how many partitions the training set is cut into
    display_name: str = ""  # default: device-<k>
    stop_after_rounds: int | None = None  # leave after training this many rounds
    wire: WireConfig = field(default_factory=WireConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    simulated: SimulatedBehaviour = field(default_factory=SimulatedBehaviour)

    def __post_init__(self) -> None:
        if not 0 <= self.client_index < self.num_clients:
            raise ValueError(
                f"client_index {self.client_index} must be within 0..{self.num_clients - 1}"
            )

    @property
    def name(self) -> str:
        return self.display_name or f"device-{self.client_index}"
