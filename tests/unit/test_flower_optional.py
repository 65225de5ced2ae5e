"""Flower is an optional extra: fedmq's commands and packages load without importing flwr
(the contract "only the Flower adapter imports flwr" in pyproject.toml says who may import
it; this checks that even the adapter does so only when a Flower client is built), and a
device asked for a Flower client where flwr is missing says what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MODULES = [
    "fedmq.cli",
    "fedmq.device_cmd",
    "fedmq.federation_cmd",
    "devices",
    "devices.client",
    "devices.run",
    "devices.flower",
    "simulation.simulate",
    "simulation.fleet_local",
    "workers.app",
    "orchestrator.service",
    "gateway.app",
]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_loading_fedmq_imports_no_flwr() -> None:
    done = _python(
        f"""
        import importlib, sys
        for name in {MODULES!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m == "flwr" or m.startswith("flwr."))
        assert not loaded, loaded
        """
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_flower_client_without_flwr_asks_for_the_extra() -> None:
    done = _python(
        """
        import sys
        from importlib.abc import MetaPathFinder

        class NoFlower(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "flwr" or name.startswith("flwr."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoFlower())
        from devices.flower import FlowerError, load_client_app
        try:
            load_client_app("tests.flower_quickstart:numpy_app")
        except FlowerError as e:
            assert "fedmq[flower]" in str(e), e
        else:
            raise AssertionError("loaded a Flower client without flwr")
        """
    )
    assert done.returncode == 0, done.stdout + done.stderr
