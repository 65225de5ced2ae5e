"""Link health and the reconnect backoff: what a service reports about its connections."""

from __future__ import annotations

import pytest

from protocol.bus import BusConfig
from protocol.bus.health import LinkHealth, LinkState, describe, summary


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_an_outage_reads_reconnecting_since_its_first_failure_then_counts_one_reconnect() -> None:
    clock = Clock()
    h = LinkHealth("consumer q", clock)
    h.up()
    clock.t = 1010.0
    assert h.down(ConnectionResetError(104, "reset")) == 1
    clock.t = 1020.0
    assert h.down("refused") == 2
    s = h.snapshot()
    assert (s.state, s.since, s.attempts, s.failures) == (LinkState.RECONNECTING, 1010.0, 2, 2)
    assert s.last_error == "refused"
    clock.t = 1030.0
    h.up()
    s = h.snapshot()
    assert (s.state, s.since, s.attempts, s.failures, s.reconnects) == (
        LinkState.CONNECTED,
        1030.0,
        0,
        2,
        1,
    )


def test_a_service_is_as_healthy_as_its_worst_link_and_stopped_links_do_not_count() -> None:
    clock = Clock()
    good, bad, gone = (LinkHealth(n, clock) for n in ("a", "b", "c"))
    good.up()
    bad.up()
    bad.down("x")
    gone.stopped()
    out = summary([good.snapshot(), bad.snapshot(), gone.snapshot()])
    assert out["state"] == "reconnecting" and out["attempts"] == 1 and out["failures"] == 1
    assert len(out["links"]) == 3
    assert summary([good.snapshot(), gone.snapshot()])["state"] == "connected"
    assert summary([])["state"] == "connected"


def test_describe_is_one_line_with_the_cause_even_when_the_message_is_empty() -> None:
    class Quiet(Exception):
        def __str__(self) -> str:
            return ""

    assert describe(Quiet(ValueError("refused"))) == "Quiet: refused"
    assert describe(RuntimeError("a\nb")) == "RuntimeError: a"
    assert describe(KeyError()) == "KeyError"


@pytest.mark.parametrize("attempt", [1, 2, 5, 30, 1000])
def test_backoff_is_capped_and_jittered_below_its_exponential_value(attempt: int) -> None:
    c = BusConfig(reconnect_backoff_s=0.5, reconnect_backoff_max_s=10.0, reconnect_jitter=0.5)
    top = min(10.0, 0.5 * 2 ** (attempt - 1))
    draws = [c.backoff(attempt) for _ in range(200)]
    assert all(top / 2 <= d <= top for d in draws)
    assert max(draws) - min(draws) > top / 10  # actually spread, not one value
    assert BusConfig(reconnect_jitter=0.0).backoff(attempt) == min(10.0, 0.5 * 2 ** (attempt - 1))
