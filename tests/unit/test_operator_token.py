"""No network-facing service runs with an operator token anyone can read in fedmq's source."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from fedmq import operator_token as tokens
from fedmq.cli import app
from fedmq.settings import Settings

AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"


def _settings(tmp_path: Path, token: str | None = None, **kw: object) -> Settings:
    return Settings(
        data_dir=tmp_path,
        operator_token=None if token is None else SecretStr(token),
        **kw,  # type: ignore[arg-type]
    )


def test_the_token_file_is_made_0600_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / tokens.TOKEN_FILE
    token, made = tokens.load_or_create(path)
    assert made and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again, made_again = tokens.load_or_create(path)
    assert (again, made_again) == (token, False)


def test_a_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / tokens.TOKEN_FILE
    tokens.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(tokens.TokenError, match="readable by others"):
        tokens.load_or_create(path)


def test_there_is_no_built_in_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDMQ_OPERATOR_TOKEN", raising=False)
    settings = Settings(data_dir=tmp_path)
    assert settings.operator_token is None
    assert tokens.configured(settings) is None
    assert tokens.find(settings) is None  # nothing generated yet either


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "gateway.example"])
def test_listening_beyond_loopback_without_a_token_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(tokens.TokenError, match="without FEDMQ_OPERATOR_TOKEN"):
        tokens.require(_settings(tmp_path), "gateway", host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_without_a_token_runs_with_no_operator(tmp_path: Path, host: str) -> None:
    assert tokens.require(_settings(tmp_path), "gateway", host) is None


@pytest.mark.parametrize("public", sorted(tokens.PUBLIC_TOKENS))
def test_a_public_example_token_is_refused_even_on_loopback(tmp_path: Path, public: str) -> None:
    for host in ("127.0.0.1", None):
        with pytest.raises(tokens.TokenError, match="example value"):
            tokens.require(_settings(tmp_path, public), "gateway", host)


def test_find_prefers_the_set_token_then_the_file(tmp_path: Path) -> None:
    made, _ = tokens.load_or_create(tokens.token_path(_settings(tmp_path)))
    assert tokens.find(_settings(tmp_path)) == made
    assert tokens.find(_settings(tmp_path, "set-explicitly-0123456789")) == (
        "set-explicitly-0123456789"
    )


def _cli(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    from fedmq.settings import get_settings

    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, args, env=env)
    finally:
        get_settings.cache_clear()
    return res.exit_code, res.output


def test_gateway_and_dashboard_on_all_interfaces_without_a_token_refuse_to_start(
    tmp_path: Path,
) -> None:
    env = {"FEDMQ_OPERATOR_TOKEN": "", "FEDMQ_DATA_DIR": str(tmp_path), "FEDMQ_BROKER_URL": AMQP}
    code, out = _cli(["gateway", "--host", "0.0.0.0"], env)
    assert code == 2 and "without FEDMQ_OPERATOR_TOKEN" in out
    code, out = _cli(["dashboard", "--host", "0.0.0.0"], env)
    assert code == 2 and "without FEDMQ_OPERATOR_TOKEN" in out


def test_an_orchestrator_on_a_broker_refuses_the_old_source_constant(tmp_path: Path) -> None:
    env = {
        "FEDMQ_OPERATOR_TOKEN": "fedmq-dev-operator-token",
        "FEDMQ_BROKER_URL": AMQP,
        "FEDMQ_DATABASE_URL": f"sqlite:///{tmp_path / 'x.sqlite'}",
    }
    code, out = _cli(["orchestrator", "--no-upgrade"], env)
    assert code == 2 and "example value" in out


def test_a_command_without_any_token_is_not_sent(tmp_path: Path) -> None:
    env = {"FEDMQ_OPERATOR_TOKEN": "", "FEDMQ_DATA_DIR": str(tmp_path), "FEDMQ_BROKER_URL": AMQP}
    code, out = _cli(["command", "pause", "--run", "r1"], env)
    assert code == 2 and "no operator token" in out
