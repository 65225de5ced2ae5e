"""Aggregation benchmark: streaming FedAvg over K ResNet-18 updates (bf16 + zstd blobs).

For K = 10 and K = 100 it times the worker's fold loop (``workers.fold.fold_updates``:
decode one blob, fold it into the float64 sum, drop it) and reports GB/s of fp32
parameters folded, next to this machine's memcpy bandwidth measured in the same run.
It also splits one update's cost into decoding and folding: on a GPU the CUDA pipeline
(issue 4, second half) will overlap the two, and its figure T_total / max(T_copy,
T_compute) belongs in this table once it exists.

To keep memory bounded, the K blobs cycle through ``DISTINCT`` real client deltas; the
fold does the same work for each whichever blob it is.

    .venv/bin/python benchmarks/aggregate.py          # K = 10 and 100, writes docs + JSON
    .venv/bin/python benchmarks/aggregate.py --quick  # K = 10 only, prints, writes nothing
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch
from _report import machine, machine_line, publish

from learning.models import resnet18
from learning.strategies import WeightedMean, make_strategy
from protocol.codec import Encoding, decode, encode
from workers.fold import GlobalModel, UpdateRef, fold_updates

GB = 1e9
DISTINCT = 8
REPEATS = 3


def base_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = resnet18(num_classes=1000)
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def client_blobs(base: dict[str, np.ndarray]) -> list[bytes]:
    """DISTINCT bf16 deltas: small random training-like changes to the float tensors."""
    rng = np.random.default_rng(1)
    blobs = []
    for _ in range(DISTINCT):
        client = {
            k: v + (1e-3 * rng.standard_normal(v.shape)).astype(np.float32)
            if v.dtype == np.float32
            else v
            for k, v in base.items()
        }
        blobs.append(encode(client, Encoding.BF16, base=base, base_version="0"))
    return blobs


def memcpy_gbps(nbytes: int = 256 * 2**20) -> float:
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return nbytes / best / GB


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fold_run(model: GlobalModel, blobs: list[bytes], k: int) -> float:
    refs = [UpdateRef(f"c{i}", str(i % DISTINCT), 100 + i) for i in range(k)]
    load = lambda sha: blobs[int(sha)]  # noqa: E731
    strategy = make_strategy("fedavg")
    return min(_timed(lambda: fold_updates(refs, load, model, strategy)) for _ in range(REPEATS))


def split_costs(model: GlobalModel, blobs: list[bytes]) -> tuple[float, float]:
    """Seconds to decode one blob and to fold one decoded update (best of several)."""
    decode_s = min(_timed(lambda: decode(blobs[0])) for _ in range(5))
    delta = {k: v for k, v in decode(blobs[0]).tensors.items() if k in model.floats}
    acc = WeightedMean()
    acc.add(delta, 1.0)
    fold_s = min(_timed(lambda: acc.add(delta, 2.0)) for _ in range(5))
    return decode_s, fold_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 10 only; print, write nothing")
    args = parser.parse_args()
    ks = [10] if args.quick else [10, 100]

    base = base_weights()
    model = GlobalModel.from_tensors(base, "0")
    blobs = client_blobs(base)
    params = sum(v.size for v in model.floats.values())
    model_bytes = model.nbytes
    blob_mib = float(np.mean([len(b) for b in blobs])) / 2**20
    memcpy = memcpy_gbps()
    decode_s, fold_s = split_costs(model, blobs)

    rows, results = [], {}
    for k in ks:
        total = fold_run(model, blobs, k)
        gbps = k * model_bytes / total / GB
        results[f"K={k}"] = {"seconds": total, "per_update_ms": 1e3 * total / k, "gbps": gbps}
        rows.append(
            f"| {k} | {total:.2f} | {1e3 * total / k:.0f} | {gbps:.2f} | {gbps / memcpy:.1%} |"
        )
    results.update(
        params=params,
        model_mib=model_bytes / 2**20,
        blob_mib=blob_mib,
        memcpy_gbps=memcpy,
        decode_ms=1e3 * decode_s,
        fold_ms=1e3 * fold_s,
        device="cpu",
    )
    table = "\n".join(
        [
            "## Aggregation (streaming FedAvg, CPU)",
            "",
            f"ResNet-18 ImageNet head: {params / 1e6:.1f} M parameters, "
            f"{model_bytes / 2**20:.1f} MiB fp32; updates are bf16 deltas + zstd, "
            f"{blob_mib:.1f} MiB each. One core folds (numpy); memcpy on this machine: "
            f"**{memcpy:.1f} GB/s** (256 MiB `np.copyto`, same run).",
            "",
            "| K updates | total s | ms / update | GB/s of fp32 folded | of memcpy |",
            "|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Per update: decode {1e3 * decode_s:.0f} ms, fold into the float64 sum "
            f"{1e3 * fold_s:.0f} ms (run one after the other on the CPU). GPU figures "
            "(host-to-device bandwidth, overlap T_total / max(T_copy, T_compute), GPU busy "
            "fraction) come with the CUDA pipeline; none measured yet.",
        ]
    )
    if args.quick:
        print(table)
        print(machine_line(machine()))
        return 0
    publish("aggregate", table, results)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
