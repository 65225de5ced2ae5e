"""What a finished federation leaves behind: a summary table, per-round JSON and a plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table


@dataclass(frozen=True)
class RoundRow:
    round: int
    accuracy: float | None
    loss: float | None
    participants: int
    seconds: float
    bytes_up: int = 0
    bytes_down: int = 0
    epsilon: float | None = None  # the run's ε after this round (differential privacy)
    extra: Mapping[str, Any] = field(default_factory=dict)


def summary_table(rows: Sequence[RoundRow], title: str) -> Table:
    table = Table(title=title)
    for col in ("round", "accuracy", "loss", "clients", "seconds", "up MiB", "down MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r.round),
            "-" if r.accuracy is None else f"{100 * r.accuracy:.2f}%",
            "-" if r.loss is None else f"{r.loss:.4f}",
            str(r.participants),
            f"{r.seconds:.2f}",
            f"{r.bytes_up / 2**20:.3f}",
            f"{r.bytes_down / 2**20:.3f}",
        )
    return table


def write_json(path: Path, rows: Sequence[RoundRow], config: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": dict(config), "rounds": [asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def plot_accuracy(path: Path, series: Mapping[str, Sequence[RoundRow]], title: str) -> Path:
    """Accuracy per round, one line per run (several runs compare on one chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in series.items():
        points = [(r.round, 100 * r.accuracy) for r in rows if r.accuracy is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
