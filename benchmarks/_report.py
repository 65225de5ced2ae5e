"""Shared output for benchmarks: one markdown section in docs/benchmarks.md, one JSON file.

Usage from a benchmark script::

    from _report import publish
    publish("codec", markdown_table_text, {"any": "json-able results"})

``publish`` replaces the text between ``<!-- bench:codec -->`` and ``<!-- /bench:codec -->``
in docs/benchmarks.md (appending the section the first time), leaving other benchmarks'
sections alone, and writes ``benchmarks/results/codec.json`` with the results plus the
machine and date. ``machine()`` alone gives that description for scripts that print.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"
_DOC_INTRO = (
    "# Benchmarks\n\n"
    "Each section is written by a script in `benchmarks/` (raw figures in "
    "`benchmarks/results/`); rerun the script to refresh its section.\n"
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """CPU model, usable cores, Python/numpy/torch/zstandard versions and the UTC date."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "zstandard": _version("zstandard"),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(info: Mapping[str, Any]) -> str:
    return (
        f"_Measured {info['date']} on {info['cpu']} ({info['cores']} cores), Python "
        f"{info['python']}, numpy {info['numpy']}, torch {info['torch']}, "
        f"zstandard {info['zstandard']}._"
    )


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Put ``markdown`` between the ``bench:<name>`` markers of ``doc``, keeping the rest."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else _DOC_INTRO
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def write_json(name: str, data: Mapping[str, Any], results: Path = RESULTS) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def publish(name: str, markdown: str, results: Mapping[str, Any]) -> dict[str, Any]:
    """Write the section (with a machine line appended) and the JSON; returns the machine."""
    info = machine()
    write_section(name, f"{markdown.rstrip()}\n\n{machine_line(info)}\n")
    write_json(name, {"benchmark": name, "machine": info, "results": results})
    return info
