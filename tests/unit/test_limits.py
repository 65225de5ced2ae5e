"""Registration limits' pieces (protocol/limits.py), without services."""

from __future__ import annotations

import pytest

from protocol.limits import (
    TokenBuckets,
    cap_refusal,
    device_info_bytes,
    device_info_refusal,
    retry_after_header,
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_bucket_lets_a_burst_through_then_its_rate_and_keys_do_not_share() -> None:
    clock = Clock()
    b = TokenBuckets(2.0, 3, clock=clock)
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("a") == pytest.approx(0.5)  # one token comes every 1/rate s
    assert b.take("b") == 0.0
    clock.t = 0.5
    assert b.take("a") == 0.0
    clock.t = 100.0  # refilled, never beyond the burst
    assert [b.take("a") for _ in range(4)][-1] > 0


def test_buckets_are_bounded_in_number_oldest_forgotten_first() -> None:
    b = TokenBuckets(1.0, 1, max_keys=2, clock=Clock())
    for key in ("a", "b", "c"):
        assert b.take(key) == 0.0
    assert b.take("c") > 0  # still known: empty
    assert b.take("a") == 0.0  # forgotten: full again


def test_device_info_and_cap_refusals_say_why_and_retry_after_is_whole_seconds() -> None:
    info = {"model": "x" * 100}
    assert device_info_bytes(info) == len('{"model":""}') + 100
    assert device_info_refusal(info, 200) is None
    assert device_info_refusal(info, 50) == "device_info is 112 bytes, more than the 50 allowed"
    assert cap_refusal("r1", 19, 20) is None
    assert cap_refusal("r1", 20, 20) == "run r1 has reached its cap of 20 registered clients"
    assert retry_after_header(0.01) == "1" and retry_after_header(2.2) == "3"
