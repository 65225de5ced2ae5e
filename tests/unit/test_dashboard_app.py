"""The dashboard without a usable database: it says so instead of showing a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).parents[2] / "dashboard" / "app.py")


def test_a_database_without_tables_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMQ_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.sqlite'}")
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert "fedmq db upgrade" in at.error[0].value
