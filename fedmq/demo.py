"""``fedmq demo``: a global model crosses the real wire in every encoding.

The wire alone, without a federation (``fedmq simulate`` runs one): codec → chunks → the
bus (in-process or RabbitMQ) → reassembly → a checked decode, as an orchestrator sending a
model to a device does it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedmq.settings import Settings
from fedmq.wiring import decode_limits, open_bus, reassembler
from learning.models import resnet18, resnet50
from protocol import chunking, codec, topology

MiB = 1024 * 1024


@dataclass(frozen=True)
class Crossing:
    encoding: str
    nbytes: int
    chunks: int
    encode_s: float
    transfer_s: float
    decode_s: float
    rel_error: float


def model_weights(name: str) -> dict[str, np.ndarray]:
    make = {"resnet18": resnet18, "resnet50": resnet50}[name]
    model = make(num_classes=10, cifar_stem=True)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _rel_error(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)
    den = sum(float(np.sum(a[k].astype(np.float64) ** 2)) for k in a)
    return (num / den) ** 0.5 if den else 0.0


def cross(
    settings: Settings,
    broker: str,
    weights: dict[str, np.ndarray],
    encodings: list[str],
    progress: Progress,
) -> list[Crossing]:
    bus = open_bus(settings, broker)
    device = f"demo-{uuid.uuid4().hex[:8]}"
    try:
        topology.declare(bus)
        queue = topology.declare_device(bus, device)
        spec = codec.spec_of(weights)
        results = []
        for enc in encodings:
            task = progress.add_task(f"{enc:>5}", total=None)
            t0 = time.perf_counter()
            blob = codec.encode(weights, enc, level=settings.zstd_level if enc != "bf16" else 1)
            t1 = time.perf_counter()
            parts = chunking.split(blob, settings.chunk_size)
            progress.update(task, total=len(parts))
            for c in parts:
                bus.publish(
                    topology.DEVICES_EXCHANGE,
                    topology.device_routing_key(device),
                    c.data,
                    headers=chunking.to_headers(c),
                )
            joiner, got = reassembler(settings), None
            while got is None:
                d = bus.get(queue, timeout=30)
                if d is None:
                    raise TimeoutError(f"{enc}: chunks stopped arriving")
                got = joiner.add(chunking.from_message(d.headers, d.body))
                d.ack()
                progress.advance(task)
            t2 = time.perf_counter()
            decoded = codec.decode(got, limits=decode_limits(settings), expected=spec)
            t3 = time.perf_counter()
            results.append(
                Crossing(
                    enc,
                    len(blob),
                    len(parts),
                    t1 - t0,
                    t2 - t1,
                    t3 - t2,
                    _rel_error(weights, decoded.tensors),
                )
            )
        bus.delete_queue(queue)
        return results
    finally:
        bus.close()


def render(results: list[Crossing], model: str, raw: int, console: Console) -> None:
    table = Table(title=f"{model} (CIFAR-10 head, {raw / MiB:.2f} MiB fp32) over the wire")
    for col in (
        "encoding",
        "MiB",
        "% of fp32",
        "chunks",
        "encode MB/s",
        "bus s",
        "decode MB/s",
        "rel. L2 error",
    ):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r.encoding,
            f"{r.nbytes / MiB:.2f}",
            f"{100 * r.nbytes / raw:.1f}",
            str(r.chunks),
            f"{raw / 1e6 / r.encode_s:.0f}",
            f"{r.transfer_s:.2f}",
            f"{raw / 1e6 / r.decode_s:.0f}",
            f"{r.rel_error:.1e}",
        )
    console.print(table)
