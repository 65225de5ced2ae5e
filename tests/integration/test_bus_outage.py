"""A broker outage far longer than the old 20 reconnect attempts: a consumer behind a proxy
that the test cuts (the shared broker itself is never touched) keeps reconnecting, says so
in its health, logs one line per attempt without a traceback, and consumes again after."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest

from protocol import topology as t
from protocol.bus import BusConfig, Delivery, connect
from protocol.bus.health import LinkState
from tests.proxy import TcpProxy

pytestmark = pytest.mark.integration

# 3 attempts per call; consumers never give up. Backoff 0.05 -> 0.2 s: a 6 s outage is
# some 30 attempts, more than the old cap of 20 (and ten times this config's own cap).
FAST = BusConfig(reconnect_attempts=3, reconnect_backoff_s=0.05, reconnect_backoff_max_s=0.2)
KEY = t.update_routing_key("run1", 1, "c1")


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[TcpProxy]:
    p = TcpProxy.for_url(amqp_url)
    yield p
    p.close()


def test_a_consumer_outlives_an_outage_of_many_more_attempts_than_the_cap(
    amqp_url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    direct = connect(amqp_url)
    behind = connect(proxy.url(amqp_url), FAST)
    got: list[bytes] = []
    arrived = threading.Event()

    def handler(d: Delivery) -> None:
        got.append(d.body)
        d.ack()
        arrived.set()

    try:
        t.declare(direct)
        consumer = behind.consume(t.UPDATES_QUEUE, handler)
        (link,) = [h for h in behind.health() if h.name.startswith("consumer")]
        assert link.state is LinkState.CONNECTED
        caplog.set_level(logging.DEBUG, logger="protocol.bus.amqp")

        proxy.cut()
        time.sleep(6.0)
        direct.publish(t.UPDATES_EXCHANGE, KEY, b"sent while the broker was away")
        (link,) = [h for h in behind.health() if h.name.startswith("consumer")]
        assert consumer.alive
        assert link.state is LinkState.RECONNECTING
        assert link.attempts > 20, link
        assert proxy.refused > 20
        proxy.restore()

        assert arrived.wait(10), "nothing consumed after the broker came back"
        assert got == [b"sent while the broker was away"]
        (link,) = [h for h in behind.health() if h.name.startswith("consumer")]
        assert (link.state, link.attempts, link.reconnects) == (LinkState.CONNECTED, 0, 1)
        assert link.failures > 20
    finally:
        behind.close()
        direct.close()

    ours = [r for r in caplog.records if r.name == "protocol.bus.amqp"]
    warnings = [r for r in ours if r.levelno == logging.WARNING and "reconnect attempt" in r.msg]
    assert len(warnings) > 20
    assert all(r.exc_info is None for r in ours if r.levelno >= logging.INFO)
    assert all("\n" not in r.getMessage() for r in warnings)
    tracebacks = [r for r in ours if r.exc_info]
    assert tracebacks and all(r.levelno == logging.DEBUG for r in tracebacks)
    assert not [r for r in caplog.records if r.name.startswith("pika") and r.levelno >= 40]


def test_a_call_still_gives_up_after_its_attempts_and_says_so_in_one_line(
    amqp_url: str, proxy: TcpProxy
) -> None:
    behind = connect(proxy.url(amqp_url), FAST)
    try:
        proxy.cut()
        began = time.monotonic()
        with pytest.raises(Exception, match="gave up after 4 attempts") as e:
            behind.queue_depth(t.UPDATES_QUEUE)
        assert time.monotonic() - began < 5
        assert "\n" not in str(e.value)
        (calls,) = [h for h in behind.health() if h.name == "calls"]
        assert calls.failures == 4
    finally:
        behind.close()
