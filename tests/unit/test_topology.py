"""The topology's names and shape: what DESIGN.md's table says, built from functions."""

from __future__ import annotations

import pytest

from protocol import topology as t
from protocol.topology import topic_matches


def test_names_follow_the_design_table() -> None:
    assert t.signals_exchange() == "fedmq.signals"
    assert t.updates_exchange() == "fedmq.updates"
    assert t.control_exchange() == "fedmq.control"
    assert t.devices_exchange() == "fedmq.devices"
    assert t.events_exchange() == "fedmq.events"
    assert t.dead_letter_exchange() == "fedmq.dead"
    assert t.DEAD_LETTER_QUEUE == "dead-letters"
    assert t.device_queue("c1") == "device.c1"
    assert t.device_routing_key("c1") == "device.c1"
    assert t.broadcast_routing_key("run-7") == "broadcast.run-7"
    assert t.update_routing_key("run-7", 3, "c1") == "update.run-7.3.c1"
    assert t.signal_routing_key("c1") == "signal.c1"
    assert t.events_queue("dash") == "events.dash"


@pytest.mark.parametrize("bad", ["", "a.b", "*", "#", "a b", "a\n", "x" * 101, "é"])
def test_ids_that_would_break_routing_keys_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        t.device_queue(bad)
    with pytest.raises(ValueError):
        t.update_routing_key(bad, 1, "c1")
    with pytest.raises(ValueError):
        t.update_routing_key("run", 1, bad)


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1"])
def test_a_round_must_be_a_non_negative_int(bad: object) -> None:
    with pytest.raises(ValueError):
        t.update_routing_key("run", bad, "c1")  # type: ignore[arg-type]


def test_the_default_topology_is_durable_and_dead_letters_every_work_queue() -> None:
    topo = t.default_topology()
    assert {e.name: e.type for e in topo.exchanges} == {
        "fedmq.signals": "topic",
        "fedmq.updates": "topic",
        "fedmq.control": "direct",
        "fedmq.devices": "topic",
        "fedmq.events": "fanout",
        "fedmq.dead": "fanout",
    }
    assert all(e.durable for e in topo.exchanges)
    assert all(q.durable and not q.exclusive and not q.auto_delete for q in topo.queues)
    work = {q.name: q.arguments for q in topo.queues if q.name != t.DEAD_LETTER_QUEUE}
    assert work == {
        name: {"x-dead-letter-exchange": "fedmq.dead"}
        for name in ("orchestrator.signals", "orchestrator.updates", "orchestrator.control")
    }
    dead = next(q for q in topo.queues if q.name == t.DEAD_LETTER_QUEUE)
    assert "x-dead-letter-exchange" not in dead.arguments  # no loop back into itself
    # ... and bounded: nothing consumes it while the orchestrator is away.
    assert dead.arguments == {
        "x-max-length": t.DEAD_LETTER_MAX_LENGTH,
        "x-max-length-bytes": t.DEAD_LETTER_MAX_BYTES,
        "x-message-ttl": int(t.DEAD_LETTER_TTL_S * 1000),
    }


def test_device_and_reply_queues_expire_and_the_bounds_come_again_as_operator_policies() -> None:
    device = t.device_topology("c1", "run1").queues[0]
    assert device.arguments["x-expires"] == int(t.DEVICE_QUEUE_EXPIRES_S * 1000)
    assert t.device_topology("c1", expires_s=None).queues[0].arguments == {
        "x-dead-letter-exchange": "fedmq.dead"
    }
    assert t.device_topology("c1", expires_s=0.25).queues[0].arguments["x-expires"] == 250
    assert device.bounded and not device.unbounded().bounded
    policies = t.operator_policies()
    assert policies["fedmq-device-queues"] == (
        r"^device\.",
        {"expires": int(t.DEVICE_QUEUE_EXPIRES_S * 1000)},
    )
    assert policies["fedmq-dead-letters"][1]["max-length"] == t.DEAD_LETTER_MAX_LENGTH


def test_celery_queues_are_left_to_celery() -> None:
    names = {q.name for q in t.default_topology().queues}
    assert names.isdisjoint({"aggregate", "evaluate", "edge"})


def bound_queues(topo: t.Topology, exchange: str, key: str) -> set[str]:
    return {
        b.queue
        for b in topo.bindings
        if b.exchange == exchange and (b.routing_key == key or topic_matches(b.routing_key, key))
    }


def test_every_key_the_functions_make_reaches_its_queue() -> None:
    topo = t.default_topology() + t.device_topology("c1", "run1")
    assert bound_queues(topo, t.SIGNALS_EXCHANGE, t.signal_routing_key("c1")) == {
        "orchestrator.signals"
    }
    assert bound_queues(topo, t.UPDATES_EXCHANGE, t.update_routing_key("run1", 12, "c1")) == {
        "orchestrator.updates"
    }
    assert bound_queues(topo, t.CONTROL_EXCHANGE, t.CONTROL_ROUTING_KEY) == {"orchestrator.control"}
    assert bound_queues(topo, t.DEVICES_EXCHANGE, t.device_routing_key("c1")) == {"device.c1"}
    assert bound_queues(topo, t.DEVICES_EXCHANGE, t.broadcast_routing_key("run1")) == {"device.c1"}
    assert bound_queues(topo, t.DEVICES_EXCHANGE, t.device_routing_key("c2")) == set()
    assert bound_queues(topo, t.DEVICES_EXCHANGE, t.broadcast_routing_key("run2")) == set()


def test_a_device_without_a_run_hears_only_its_own_key() -> None:
    topo = t.device_topology("c1")
    assert topo.exchanges == ()  # the orchestrator's: a device user may not declare them
    assert [(b.queue, b.routing_key) for b in topo.bindings] == [("device.c1", "device.c1")]
    assert topo.queues[0].arguments == {
        "x-dead-letter-exchange": "fedmq.dead",
        "x-expires": int(t.DEVICE_QUEUE_EXPIRES_S * 1000),
    }


def test_an_observer_queue_is_private_and_temporary() -> None:
    topo = t.observer_topology("dash")
    (queue,) = topo.queues
    assert (queue.name, queue.exclusive, queue.auto_delete, queue.durable) == (
        "events.dash",
        True,
        True,
        False,
    )
    assert topo.bindings == (t.Binding("fedmq.events", "events.dash", ""),)


def test_adding_topologies_keeps_each_declaration_once() -> None:
    both = t.exchanges() + t.device_topology("c1", "r") + t.device_topology("c2", "r")
    assert both.exchanges == t.exchanges().exchanges
    assert [q.name for q in both.queues] == ["device.c1", "device.c2"]
    assert len(both.bindings) == 4


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.#", "a", True),
        ("a.#.c", "a.x.y.c", True),
        ("#", "anything.at.all", True),
        ("signal.*", "signal.c1.extra", False),
    ],
)
def test_topic_patterns_match_whole_words(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches
