"""The dashboard's pure helpers: how values are shown and where it connects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dashboard import config
from dashboard import format as fmt


def test_sizes_read_in_binary_units() -> None:
    assert fmt.size(None) == "—"
    assert fmt.size(512) == "512 B"
    assert fmt.size(1536) == "1.5 KiB"
    assert fmt.size(3 * 1024**3) == "3.0 GiB"


def test_autorun_is_off_when_unset_or_finished() -> None:
    assert fmt.autorun(None) == fmt.autorun(0) == "off"
    assert fmt.autorun(3) == "3 left"


def test_badges_name_every_client_state_and_pass_unknown_ones_through() -> None:
    for state in ("join", "ready", "training", "update", "finish", "offline"):
        assert fmt.badge(state).endswith(state) and fmt.badge(state) != state
    assert fmt.badge("weird") == "weird"


def test_times_read_as_ages() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert fmt.ago(now - timedelta(seconds=5), now) == "5 s ago"
    assert fmt.ago(now - timedelta(minutes=3), now) == "3 min ago"
    assert fmt.percent(0.8472) == "84.72%"


def test_config_comes_from_the_environment_fedmq_dashboard_sets() -> None:
    c = config.from_env(
        {
            "FEDMQ_DATABASE_URL": "postgresql+psycopg://db/x",
            "FEDMQ_BROKER_URL": "amqp://rabbit/%2F",
            "FEDMQ_OPERATOR_TOKEN": "t" * 20,
            "FEDMQ_DASHBOARD_REFRESH_S": "1.5",
        }
    )
    assert (c.database_url, c.refresh_s, c.can_send) == ("postgresql+psycopg://db/x", 1.5, True)
    # The bare embedded bus lives in another process: commands could never arrive.
    assert not config.from_env({}).can_send
    assert config.from_env({"FEDMQ_BROKER_URL": "memory://shared"}).can_send
