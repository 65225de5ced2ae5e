"""Chunking and reassembly: any order, duplicates, conflicts, caps and timeouts."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chunking import (
    BLOB_ID_HEADER,
    BLOB_SHA256_HEADER,
    BLOB_SIZE_HEADER,
    CHUNK_COUNT_HEADER,
    CHUNK_INDEX_HEADER,
    DEFAULT_CHUNK_SIZE,
    Chunk,
    ChunkError,
    Reassembler,
    from_message,
    is_chunk,
    iter_chunks,
    split,
    to_headers,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@st.composite
def shuffled_with_duplicates(draw: st.DrawFn) -> tuple[bytes, list[Chunk]]:
    blob = draw(st.binary(max_size=3000))
    chunks = split(blob, draw(st.integers(1, 700)))
    order = draw(st.permutations(chunks))
    extra = draw(st.lists(st.sampled_from(chunks), max_size=len(chunks) * 2))
    # Duplicates may come before, among or after the originals.
    arrivals = list(order)
    for i, dup in enumerate(extra):
        arrivals.insert(draw(st.integers(0, len(arrivals))) if i % 2 else len(arrivals), dup)
    return blob, arrivals


@given(shuffled_with_duplicates())
def test_chunks_in_any_order_with_duplicates_give_back_the_blob_exactly_once(
    case: tuple[bytes, list[Chunk]],
) -> None:
    blob, arrivals = case
    reassembler = Reassembler()
    results = [r for r in map(reassembler.add, arrivals) if r is not None]
    assert results == [blob]
    assert reassembler.partial_blobs == 0
    assert reassembler.buffered_bytes == 0


@given(st.binary(max_size=2000), st.integers(1, 500))
def test_chunk_headers_round_trip(blob: bytes, chunk_size: int) -> None:
    for chunk in split(blob, chunk_size, blob_id="b-1"):
        headers = to_headers(chunk)
        assert all(isinstance(v, str | int) for v in headers.values())
        assert is_chunk(headers)
        assert from_message(headers, chunk.data) == chunk


def test_a_blob_is_cut_at_the_default_chunk_size_of_4_mib() -> None:
    blob = b"\x01" * (DEFAULT_CHUNK_SIZE + 1)
    chunks = split(blob)
    assert [len(c.data) for c in chunks] == [DEFAULT_CHUNK_SIZE, 1]
    assert {(c.count, c.size, c.sha256) for c in chunks} == {
        (2, len(blob), hashlib.sha256(blob).hexdigest())
    }
    assert len(split(b"small")) == 1


def test_an_empty_blob_travels_as_one_empty_chunk() -> None:
    (chunk,) = split(b"")
    assert (chunk.count, chunk.size, chunk.data) == (1, 0, b"")
    assert Reassembler().add(chunk) == b""


def test_a_positive_chunk_size_is_required() -> None:
    with pytest.raises(ChunkError):
        split(b"abc", 0)


GOOD: dict[str, Any] = {
    BLOB_ID_HEADER: "b-1",
    CHUNK_INDEX_HEADER: 0,
    CHUNK_COUNT_HEADER: 2,
    BLOB_SIZE_HEADER: 6,
    BLOB_SHA256_HEADER: "0" * 64,
}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (BLOB_ID_HEADER, None),
        (BLOB_ID_HEADER, ""),
        (BLOB_ID_HEADER, "a/b"),
        (BLOB_ID_HEADER, "x" * 129),
        (BLOB_ID_HEADER, 7),
        (CHUNK_INDEX_HEADER, -1),
        (CHUNK_INDEX_HEADER, 2),  # not below the count
        (CHUNK_INDEX_HEADER, "0"),
        (CHUNK_INDEX_HEADER, True),
        (CHUNK_COUNT_HEADER, 0),
        (CHUNK_COUNT_HEADER, 7),  # more chunks than bytes
        (CHUNK_COUNT_HEADER, 2**21),
        (BLOB_SIZE_HEADER, -6),
        (BLOB_SIZE_HEADER, 6.0),
        (BLOB_SHA256_HEADER, "A" * 64),
        (BLOB_SHA256_HEADER, "0" * 63),
        (BLOB_SHA256_HEADER, b"\xff" * 64),
    ],
)
def test_bad_header_values_are_chunk_errors(name: str, value: Any) -> None:
    with pytest.raises(ChunkError):
        from_message({**GOOD, name: value}, b"abc")


def test_a_body_larger_than_the_blob_or_empty_is_a_chunk_error() -> None:
    assert from_message(GOOD, b"abc").data == b"abc"
    for body in (b"", b"1234567"):
        with pytest.raises(ChunkError):
            from_message(GOOD, body)


def test_headers_sent_as_bytes_are_accepted() -> None:
    headers = {**GOOD, BLOB_ID_HEADER: b"b-1", BLOB_SHA256_HEADER: b"0" * 64}
    assert from_message(headers, b"abc").blob_id == "b-1"


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(list(GOOD)),
        st.none() | st.booleans() | st.integers() | st.text(max_size=70) | st.binary(max_size=70),
    ),
    st.binary(max_size=20),
)
def test_arbitrary_headers_never_raise_anything_but_chunk_error(
    headers: dict[str, Any], body: bytes
) -> None:
    with contextlib.suppress(ChunkError):
        from_message({**GOOD, **headers}, body)
    assert not is_chunk(None)


def test_a_duplicate_with_different_content_is_an_error() -> None:
    first, second = split(b"abcdef", 3, blob_id="b")
    r = Reassembler()
    r.add(first)
    with pytest.raises(ChunkError, match="different content"):
        r.add(replace(first, data=b"xyz"))
    assert r.add(second) == b"abcdef"


@pytest.mark.parametrize(
    "change",
    [{"count": 3}, {"size": 7}, {"sha256": "f" * 64}],
    ids=["count", "size", "sha256"],
)
def test_a_chunk_that_contradicts_its_blob_is_an_error(change: dict[str, Any]) -> None:
    first, second = split(b"abcdef", 3, blob_id="b")
    r = Reassembler()
    r.add(first)
    with pytest.raises(ChunkError, match="disagrees"):
        r.add(replace(second, **change))
    assert r.add(second) == b"abcdef"
    with pytest.raises(ChunkError, match="contradicts"):
        r.add(replace(second, **change))  # also once the blob is complete


def test_a_corrupted_blob_fails_its_hash_and_is_forgotten() -> None:
    first, second = split(b"abcdef", 3, blob_id="b")
    r = Reassembler()
    r.add(first)
    with pytest.raises(ChunkError, match="SHA-256") as caught:
        r.add(replace(second, data=b"XYZ"))
    assert caught.value.blob_id == "b"
    assert (r.partial_blobs, r.buffered_bytes) == (0, 0)


def test_chunks_that_add_up_to_more_than_the_blob_are_refused() -> None:
    first, second = split(b"abcdef", 3, blob_id="b")
    r = Reassembler()
    r.add(replace(first, data=b"abcde"))
    with pytest.raises(ChunkError, match="exceed"):
        r.add(second)


def test_a_blob_claiming_more_than_the_cap_is_refused_before_buffering() -> None:
    r = Reassembler(max_blob_bytes=10)
    (chunk,) = split(b"x" * 11, 100)
    with pytest.raises(ChunkError, match="cap"):
        r.add(chunk)
    assert r.partial_blobs == 0


def test_buffered_bytes_over_all_partial_blobs_are_capped() -> None:
    r = Reassembler(max_buffered_bytes=8)
    a = split(b"a" * 10, 5, blob_id="a")
    b = split(b"b" * 10, 5, blob_id="b")
    r.add(a[0])
    with pytest.raises(ChunkError, match="exceed"):
        r.add(b[0])
    r.discard("a")
    r.add(b[0])
    assert r.buffered_bytes == 5


def test_too_many_partial_blobs_are_refused() -> None:
    r = Reassembler(max_partial_blobs=2)
    for name in ("a", "b"):
        r.add(split(b"xy", 1, blob_id=name)[0])
    with pytest.raises(ChunkError, match="partial blobs"):
        r.add(split(b"xy", 1, blob_id="c")[0])


def test_an_idle_incomplete_blob_expires_with_a_clear_error() -> None:
    clock = Clock()
    r = Reassembler(timeout_s=30, clock=clock)
    stale = split(b"abcdef", 2, blob_id="stale")
    busy = split(b"uvwxyz", 2, blob_id="busy")
    r.add(stale[0])
    r.add(busy[0])
    clock.now += 20
    r.add(busy[1])  # progress keeps a blob alive
    assert r.expire() == []
    clock.now += 15
    (error,) = r.expire()
    assert isinstance(error, ChunkError) and error.blob_id == "stale"
    assert "incomplete after 35.0 s idle: 1 of 3 chunks" in str(error)
    assert r.partial_blobs == 1
    assert r.expire(now=clock.now + 30)[0].blob_id == "busy"
    assert (r.partial_blobs, r.buffered_bytes) == (0, 0)


def test_a_full_table_makes_room_by_expiring_idle_blobs_and_still_reports_them() -> None:
    clock = Clock()
    r = Reassembler(max_partial_blobs=1, timeout_s=5, clock=clock)
    r.add(split(b"xy", 1, blob_id="old")[0])
    clock.now += 6
    assert r.add(split(b"z", 1, blob_id="new")[0]) == b"z"
    assert [e.blob_id for e in r.expire()] == ["old"]


def test_a_chunk_of_a_completed_blob_is_a_harmless_duplicate() -> None:
    chunks = split(b"abcdef", 4, blob_id="b")
    r = Reassembler()
    assert [r.add(c) for c in chunks] == [None, b"abcdef"]
    assert r.add(chunks[0]) is None
    assert r.partial_blobs == 0


def test_iter_chunks_accepts_any_bytes_like_and_chunk_error_is_a_value_error() -> None:
    assert b"".join(c.data for c in iter_chunks(bytearray(b"hello"), 2)) == b"hello"
    assert issubclass(ChunkError, ValueError)
