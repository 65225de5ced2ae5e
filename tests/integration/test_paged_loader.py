"""Paged blob reads for the fold (``workers.tasks.common.PagedLoader``), on both backends:
the same bytes as one-by-one reads, a page per ``page_blobs`` or ``page_bytes`` (never
more held), a bad blob failing only its own read, and the fold's skips and repeats."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore, migrations
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import BlobChunk, BlobKind
from workers.tasks.common import PagedLoader, blob_loader

pytestmark = pytest.mark.integration


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    migrations.upgrade(db_url)
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _store(factory: sessionmaker[Session], blobs: list[bytes]) -> list[str]:
    with session_scope(factory) as s:
        return [blobstore.put(s, b, BlobKind.UPDATE, chunk_size=1024) for b in blobs]


def test_pages_hold_the_same_bytes_as_single_reads(factory: sessionmaker[Session]) -> None:
    blobs = [os.urandom(100 + 37 * i) for i in range(150)]
    shas = _store(factory, blobs)
    load = blob_loader(factory, shas, page_blobs=64)
    assert isinstance(load, PagedLoader)
    assert [load(sha) for sha in shas] == blobs
    assert load.pages == 3  # 64 + 64 + 22
    single = blob_loader(factory)
    assert single(shas[5]) == blobs[5]


def test_a_page_is_bounded_by_bytes_and_never_holds_more(factory: sessionmaker[Session]) -> None:
    blobs = [os.urandom(4000) for _ in range(10)]
    shas = _store(factory, blobs)
    load = PagedLoader(factory, shas, page_blobs=64, page_bytes=10_000)
    for i, sha in enumerate(shas):
        assert load(sha) == blobs[i]
        held = sum(len(v) for v in load._page.values() if isinstance(v, bytes))
        assert held <= 10_000 - 4000  # what is left of a two-blob page, then nothing
    assert load.pages == 5
    big = PagedLoader(factory, shas, page_bytes=0)  # always one blob a page, whatever its size
    assert [big(sha) for sha in shas] == blobs and big.pages == 10


def test_skips_repeats_and_strangers_are_served_right(factory: sessionmaker[Session]) -> None:
    blobs = [os.urandom(500 + i) for i in range(8)]
    shas = _store(factory, blobs)
    order = [shas[0], shas[1], shas[0], shas[2], shas[3], shas[4], shas[5], shas[6]]
    load = PagedLoader(factory, order, page_blobs=4)
    assert load(shas[0]) == blobs[0]
    assert load(shas[0]) == blobs[0]  # positions 0 and 2, one page (read once)
    assert load(shas[2]) == blobs[2]  # position 1 skipped (its update was unusable)
    assert load(shas[7]) == blobs[7]  # not in the order: read alone
    assert load(shas[5]) == blobs[5]  # jumps ahead: the page starts there
    assert load(shas[6]) == blobs[6]
    assert load.pages == 2


def test_a_bad_blob_fails_its_own_read_only(factory: sessionmaker[Session]) -> None:
    blobs = [os.urandom(3000) for _ in range(3)]
    shas = _store(factory, blobs)
    with session_scope(factory) as s:
        s.execute(delete(BlobChunk).where(BlobChunk.sha256 == shas[1], BlobChunk.idx == 0))
    missing = "0" * 64
    load = PagedLoader(factory, [shas[0], shas[1], missing, shas[2]])
    assert load(shas[0]) == blobs[0]
    with pytest.raises(blobstore.BlobCorrupt, match="chunk 0 of 3 is missing"):
        load(shas[1])
    with pytest.raises(blobstore.BlobNotFound):
        load(missing)
    assert load(shas[2]) == blobs[2]
    assert load.pages == 1
