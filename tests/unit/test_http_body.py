"""The one bounded body reader (protocol/http_body.py) that the gateway and the browser
device's routes share: a bad Content-Length is a 400, a declared or streamed body over the
limit a 413, and a stream is never read past the limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from protocol.http_body import BodyRefused, read_limited


class Parts:
    """A chunked body of ``count`` parts of ``size`` bytes that counts what was pulled."""

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size, self.pulled = count, size, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.pulled += 1
            yield b"x" * self.size


def _read(declared: str | None, parts: Parts, limit: int) -> bytes:
    return asyncio.run(read_limited(declared, parts, limit))


def test_a_body_within_the_limit_is_read_whole() -> None:
    assert _read("40", Parts(4, 10), limit=40) == b"x" * 40
    assert _read(None, Parts(4, 10), limit=40) == b"x" * 40
    assert _read(None, Parts(0, 10), limit=40) == b""


@pytest.mark.parametrize("declared", ["abc", "-1", "1e3", " 12", "12 ", "", "\u00b2", "0x10"])
def test_a_content_length_that_is_not_a_byte_count_is_a_400(declared: str) -> None:
    parts = Parts(1, 1)
    with pytest.raises(BodyRefused) as refused:
        _read(declared, parts, limit=100)
    assert refused.value.status == 400 and "Content-Length" in refused.value.reason
    assert parts.pulled == 0


@pytest.mark.parametrize("declared", ["101", "9" * 40])
def test_a_declared_length_over_the_limit_is_a_413_before_any_read(declared: str) -> None:
    parts = Parts(1000, 1000)
    with pytest.raises(BodyRefused) as refused:
        _read(declared, parts, limit=100)
    assert refused.value.status == 413 and "limit of 100" in refused.value.reason
    assert parts.pulled == 0


def test_a_chunked_body_over_the_limit_stops_being_read_at_the_limit() -> None:
    parts = Parts(10_000, 1024)  # 10 MiB on offer, 8 KiB allowed
    with pytest.raises(BodyRefused) as refused:
        _read(None, parts, limit=8 * 1024)
    assert refused.value.status == 413 and "limit" in refused.value.reason
    assert parts.pulled == 9  # the 8 that fit, and the one that would not


def test_a_body_longer_than_it_declared_is_still_capped() -> None:
    parts = Parts(100, 10)
    with pytest.raises(BodyRefused) as refused:
        _read("10", parts, limit=50)
    assert refused.value.status == 413 and parts.pulled == 6
