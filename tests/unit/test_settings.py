"""Settings: embedded defaults, FEDMQ_ overrides, and README's table in step with the class."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq import config_table
from fedmq.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_are_the_embedded_mode_and_need_no_server() -> None:
    settings = Settings(_env_file=None)
    assert settings.embedded
    assert settings.database_url.startswith("sqlite")
    assert settings.chunk_size == 4 * 1024 * 1024


def test_fedmq_variables_override_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    monkeypatch.setenv("FEDMQ_CHUNK_SIZE", "1024")
    settings = Settings(_env_file=None)
    assert not settings.embedded
    assert settings.chunk_size == 1024


def test_nonsense_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_CHUNK_SIZE", "-1")
    with pytest.raises(ValueError, match="chunk_size"):
        Settings(_env_file=None)


def test_readme_configuration_table_matches_the_settings_class() -> None:
    text = README.read_text()
    assert config_table.BEGIN in text, "README lost its configuration table markers"
    assert config_table.replace_in(text) == text, (
        "README's configuration table is stale: run `fedmq config --write-readme README.md`"
    )


def test_every_setting_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"


@pytest.mark.parametrize(
    ("raw", "device"), [("CUDA", "cuda"), (" Cuda:1 ", "cuda:1"), ("AUTO", "auto")]
)
def test_the_worker_device_is_read_whatever_its_case(
    monkeypatch: pytest.MonkeyPatch, raw: str, device: str
) -> None:
    monkeypatch.setenv("FEDMQ_WORKER_DEVICE", raw)
    assert Settings().worker_device == device


def test_a_worker_set_to_a_gpu_it_does_not_have_refuses_to_start() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
        "FEDMQ_WORKER_DEVICE": "cuda",
    }
    done = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA device is available" in done.stdout + done.stderr
