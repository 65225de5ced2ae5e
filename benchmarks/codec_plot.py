"""The codec benchmark as a picture: size of each format relative to raw fp32.

Reads ``benchmarks/results/codec.json`` (written by ``benchmarks/codec.py``) and writes
``docs/img/codec_sizes.png``; ``codec.py`` calls it after every full run.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "codec.json"
OUT = ROOT / "docs" / "img" / "codec_sizes.png"
MODEL = "ResNet-18 CIFAR-10"
ROWS = [
    ("pickle", "pickle", None),
    ("paper: bf16+zstd", "paper", None),
    ("fedmq fp32", "full_fp32", "delta_fp32"),
    ("fedmq bf16", "full_bf16", "delta_bf16"),
    ("fedmq fp16", "full_fp16", "delta_fp16"),
    ("fedmq int8", "full_int8", "delta_int8"),
    ("fedmq top-k 1%", None, "delta_topk"),
]


def plot(results_path: Path = RESULTS, out: Path = OUT) -> Path:
    sizes = json.loads(results_path.read_text())["results"]["sizes_bytes"][MODEL]
    raw = sizes["raw"]
    labels = [r[0] for r in ROWS]
    full = [100 * sizes[k] / raw if k else 0.0 for _, k, _ in ROWS]
    delta = [100 * sizes[k] / raw if k else 0.0 for _, _, k in ROWS]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    y = range(len(ROWS))
    ax.barh([i - 0.2 for i in y], full, height=0.4, label="full weights")
    ax.barh([i + 0.2 for i in y], delta, height=0.4, label="training delta")
    ax.axvline(39.0, color="grey", ls="--", lw=1)
    ax.text(39.5, len(ROWS) - 0.6, "target 39% (paper)", fontsize=8, color="grey")
    ax.axvline(12.5, color="grey", ls=":", lw=1)
    ax.text(13.0, len(ROWS) - 1.1, "delta target 1/8", fontsize=8, color="grey")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"% of raw fp32 ({raw / 2**20:.2f} MiB)")
    ax.set_title(f"{MODEL}: bytes on the wire by format")
    ax.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot())
