"""Device micro-batch pipelining (``train_split(pipeline=True)``): how much time it saves.

A slow device and a slow edge, made so by fixed delays (``time.sleep``: they do not compete
for the CPU, so the overlap shows even on two shared cores): the head's forward takes
``head_delay_s`` more, the edge's forward and backward ``edge_delay_s`` more each. The
plain path waits for head, edge forward and edge backward in turn; the pipelined one
computes the next batch's head during the edge's backward, so it should save about one
head delay a batch. Both train the same MLP on the same data; the time is the fastest of
``repeats`` runs after a warm-up (torch's first steps are slow).

The tests only check that the overlap happens (``tests/unit/test_split_pipeline.py``, by
the order of events); this script measures what it is worth.

    .venv/bin/python benchmarks/split_pipeline.py          # writes docs/benchmarks.md + JSON
    .venv/bin/python benchmarks/split_pipeline.py --quick  # fewer runs, prints, writes nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, machine_line, publish

from learning.models import build_model
from learning.split import LocalEdge, sgd, split_model, train_split


@dataclass(frozen=True)
class Setup:
    rows: int = 512
    batch_size: int = 16
    head_delay_s: float = 0.004
    edge_delay_s: float = 0.004
    repeats: int = 5
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 11


QUICK = Setup(rows=128, repeats=2)


class SlowHead(nn.Module):
    """A slow device: the head's forward takes ``delay_s`` longer."""

    def __init__(self, inner: nn.Module, delay_s: float) -> None:
        super().__init__()
        self.inner, self.delay_s = inner, delay_s

    def forward(self, x: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        out: Tensor = self.inner(x)
        return out


class SlowEdge(LocalEdge):
    """A slow edge: forward and backward each take ``delay_s`` longer."""

    delay_s: float = 0.0

    def forward(self, acts: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        return super().forward(acts)

    def backward(self, grad_out: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        return super().backward(grad_out)


def _data(rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    w = rng.standard_normal((64, 10)).astype(np.float32)
    return x, (x @ w).argmax(axis=1)


def timed_run(setup: Setup, pipeline: bool, rows: int | None = None) -> float:
    """Seconds for one epoch over ``rows`` rows (default: the setup's)."""
    x, y = _data(rows or setup.rows)
    model = build_model("mlp", num_classes=10, input_shape=[64], seed=5, hidden=[32, 24, 16])
    base = split_model(model)
    split = dataclasses.replace(base, head=SlowHead(base.head, setup.head_delay_s))
    edge = SlowEdge(split.body, sgd(split.body.parameters(), lr=setup.lr))
    edge.delay_s = setup.edge_delay_s
    began = time.perf_counter()
    train_split(
        split,
        edge,
        x,
        y,
        epochs=1,
        batch_size=setup.batch_size,
        lr=setup.lr,
        momentum=setup.momentum,
        seed=setup.seed,
        pipeline=pipeline,
    )
    return time.perf_counter() - began


def run(setup: Setup) -> dict[str, Any]:
    timed_run(setup, False, 64), timed_run(setup, True, 64)  # warm-up
    plain = min(timed_run(setup, False) for _ in range(setup.repeats))
    pipelined = min(timed_run(setup, True) for _ in range(setup.repeats))
    batches = -(-setup.rows // setup.batch_size)
    return {
        "batches": batches,
        "plain_s": plain,
        "pipelined_s": pipelined,
        "plain_ms_per_batch": 1000 * plain / batches,
        "pipelined_ms_per_batch": 1000 * pipelined / batches,
        "saved": 1 - pipelined / plain,
    }


def markdown(r: dict[str, Any], setup: Setup) -> str:
    return (
        "## Device micro-batch pipelining\n\n"
        f"`benchmarks/split_pipeline.py`: one epoch of {setup.rows} rows in batches of "
        f"{setup.batch_size} ({r['batches']} batches), an MLP 64-32-24-16-10 cut into "
        f"head, body and tail, the body on an in-process edge (`LocalEdge`). The head's "
        f"forward sleeps {1000 * setup.head_delay_s:.0f} ms more and the edge's forward "
        f"and backward {1000 * setup.edge_delay_s:.0f} ms more each, so the stages take "
        "time without competing for the CPU. Fastest of "
        f"{setup.repeats} runs after a warm-up.\n\n"
        "| path | seconds | ms per batch |\n|---|---|---|\n"
        f"| plain (`pipeline=False`) | {r['plain_s']:.3f} | {r['plain_ms_per_batch']:.1f} |\n"
        f"| pipelined (`pipeline=True`) | {r['pipelined_s']:.3f} | "
        f"{r['pipelined_ms_per_batch']:.1f} |\n\n"
        f"Pipelining saved {100 * r['saved']:.0f}% here: the plain path waits for the head, "
        "the edge's forward and its backward in turn; the pipelined one computes the next "
        "batch's head while the edge runs this batch's backward, at the cost of a head "
        "update one batch late (`learning/split/step.py`). "
        "`tests/unit/test_split_pipeline.py` checks that overlap by the order of events, "
        "not by time.\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, print only")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else Setup()
    torch.set_num_threads(1)
    result = run(setup)
    text = markdown(result, setup)
    if args.quick:
        print(text)
        print(machine_line(machine()))
    else:
        publish("split-pipeline", text, {"setup": asdict(setup), **result})
        print(text)
    return result


if __name__ == "__main__":
    main()
