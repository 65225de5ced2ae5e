"""The blob store on both backends: exact round trips, idempotence, corruption, retention."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, delete, event, func, select, update
from sqlalchemy.orm import Session

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, session_scope
from db.models import Blob, BlobChunk, BlobKind, Participation, RoundState

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    migrations.upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _count(s: Session, model: type[Blob] | type[BlobChunk]) -> int:
    return s.scalar(select(func.count()).select_from(model)) or 0


def test_a_blob_of_many_chunks_round_trips_bit_exact(engine: Engine) -> None:
    data = os.urandom(10 * MiB + 123)  # a short last chunk too
    with session_scope(engine) as s:
        sha = blobstore.put(s, data, BlobKind.MODEL, chunk_size=1 * MiB)

    assert sha == hashlib.sha256(data).hexdigest()
    with session_scope(engine) as s:
        assert _count(s, BlobChunk) == 11
        assert blobstore.exists(s, sha)
        assert blobstore.size(s, sha) == len(data)
        assert blobstore.get(s, sha) == data
        pieces = list(blobstore.open_stream(s, sha))
    assert all(len(p) <= MiB for p in pieces)
    assert b"".join(pieces) == data


def test_put_stream_stores_the_same_blob_as_put(engine: Engine) -> None:
    data = os.urandom(3 * 1000 + 7)
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, len(data)), 20))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    with session_scope(engine) as s:
        streamed = blobstore.put_stream(s, iter(pieces), BlobKind.UPDATE, chunk_size=1000)
        again = blobstore.put(s, data, BlobKind.UPDATE, chunk_size=1000)

    assert streamed == again == hashlib.sha256(data).hexdigest()
    with session_scope(engine) as s:
        assert _count(s, Blob) == 1
        assert _count(s, BlobChunk) == 4
        assert blobstore.get(s, streamed) == data


def test_putting_the_same_bytes_twice_stores_them_once(engine: Engine) -> None:
    data = os.urandom(5000)
    with session_scope(engine) as s:
        first = blobstore.put(s, data, BlobKind.UPDATE, chunk_size=1024)
    with session_scope(engine) as s:
        second = blobstore.put(s, data, BlobKind.UPDATE, chunk_size=1024)
        assert first == second
        assert _count(s, Blob) == 1
        assert _count(s, BlobChunk) == 5


def test_an_empty_blob_round_trips(engine: Engine) -> None:
    with session_scope(engine) as s:
        sha = blobstore.put(s, b"", BlobKind.OTHER)
        assert blobstore.get(s, sha) == b""
        assert blobstore.size(s, sha) == 0


def test_a_corrupted_chunk_is_detected_on_read(engine: Engine) -> None:
    data = os.urandom(4096)
    with session_scope(engine) as s:
        sha = blobstore.put(s, data, BlobKind.MODEL, chunk_size=1024)
        bad = bytearray(data[2048:3072])
        bad[10] ^= 0x01
        s.execute(
            update(BlobChunk)
            .where(BlobChunk.sha256 == sha, BlobChunk.idx == 2)
            .values(data=bytes(bad))
        )

    with session_scope(engine) as s:
        with pytest.raises(blobstore.BlobCorrupt, match="hashes to"):
            blobstore.get(s, sha)
        stream = blobstore.open_stream(s, sha)
        with pytest.raises(blobstore.BlobCorrupt):
            list(stream)


def test_a_missing_chunk_or_blob_is_reported_clearly(engine: Engine) -> None:
    with session_scope(engine) as s:
        sha = blobstore.put(s, os.urandom(4096), BlobKind.MODEL, chunk_size=1024)
        s.execute(delete(BlobChunk).where(BlobChunk.idx == 1))

    with session_scope(engine) as s:
        with pytest.raises(blobstore.BlobCorrupt, match="chunk 1 of 4 is missing"):
            blobstore.get(s, sha)
        with pytest.raises(blobstore.BlobNotFound):
            blobstore.get(s, "0" * 64)
        with pytest.raises(blobstore.BlobNotFound):
            blobstore.open_stream(s, "0" * 64)
        with pytest.raises(ValueError, match="SHA-256"):
            blobstore.get(s, "not-a-hash")
        assert not blobstore.exists(s, "0" * 64)


def test_retention_keeps_the_last_rounds_updates_and_every_model(engine: Engine) -> None:
    """Rounds 1-5 done, 6 open; keep 2 → the updates of rounds 1-4 go, except bytes that
    a kept round or a model version also uses."""
    chunk = 100
    shared = b"same-bytes-sent-in-round-1-and-round-6" * 10
    updates: dict[int, list[str]] = {}
    models: list[str] = []
    with session_scope(engine) as s:
        run = q.create_run(s, "r")
        other_run = q.create_run(s, "other")
        a = q.register_client(s, run.id, "a", q.hash_token("a"))
        b = q.register_client(s, run.id, "b", q.hash_token("b"))
        models.append(blobstore.put(s, b"model-0", BlobKind.MODEL, chunk_size=chunk))
        q.create_model_version(s, run.id, models[0])
        for n in range(1, 7):
            rnd = q.create_round(s, run.id, n, quorum=2, selected=[a, b])
            blob_a = shared if n in (1, 6) else os.urandom(250)
            # Round 2's update from b is byte-identical to the model of round 2.
            blob_b = b"model-2" if n == 2 else os.urandom(300)
            updates[n] = [
                blobstore.put(s, x, BlobKind.UPDATE, chunk_size=chunk) for x in (blob_a, blob_b)
            ]
            for client, sha in zip((a, b), updates[n], strict=True):
                q.record_update(s, rnd.id, client, update_sha=sha, num_samples=1, nbytes=1)
            if n < 6:
                q.set_round_state(s, rnd.id, RoundState.DONE)
                models.append(blobstore.put(s, f"model-{n}".encode(), BlobKind.MODEL))
                q.create_model_version(s, run.id, models[-1], round_id=rnd.id)
        # Another run's participation keeps its blob alive too.
        c = q.register_client(s, other_run.id, "c", q.hash_token("c"))
        other_round = q.create_round(s, other_run.id, 1, quorum=1, selected=[c])
        q.record_update(s, other_round.id, c, update_sha=updates[3][1], num_samples=1, nbytes=1)

    doomed = {updates[1][1], updates[2][0], updates[3][0], *updates[4]}
    with session_scope(engine) as s:
        expected = sum(blobstore.size(s, sha) for sha in doomed)
        freed = blobstore.apply_retention(s, run.id, keep_update_rounds=2)

    assert freed == expected
    with session_scope(engine) as s:
        for n, shas in updates.items():
            for sha in shas:
                assert blobstore.exists(s, sha) == (sha not in doomed), (n, sha)
        for sha in models:
            assert blobstore.get(s, sha)
        old_refs = s.scalars(
            select(Participation.update_sha).where(Participation.update_sha.in_(doomed))
        ).all()
        assert old_refs == []
        assert blobstore.apply_retention(s, run.id, keep_update_rounds=2) == 0

    with session_scope(engine) as s:  # keep 0: every finished round, never the open one
        blobstore.apply_retention(s, run.id, keep_update_rounds=0)
        assert all(blobstore.exists(s, sha) for sha in updates[6])
        assert not blobstore.exists(s, updates[5][0])
        assert blobstore.exists(s, updates[3][1])  # the other run still uses it


def _statements(engine: Engine) -> list[str]:
    """Every SQL statement ``engine`` runs from now on."""
    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    return seen


def test_get_page_reads_many_blobs_in_two_statements(engine: Engine) -> None:
    blobs = [os.urandom(n) for n in (10, 3000, 0, 2500, 700)]
    with session_scope(engine) as s:
        shas = [blobstore.put(s, b, BlobKind.UPDATE, chunk_size=1024) for b in blobs]
    seen = _statements(engine)
    with session_scope(engine) as s:
        page = blobstore.get_page(s, [*shas, shas[1]], max_bytes=1 << 20)  # a repeat: once
    selects = [q for q in seen if q.lstrip().upper().startswith("SELECT")]
    # On psycopg the chunk query runs on the driver's cursor (binary results), unseen here.
    assert len(selects) == (1 if engine.dialect.driver == "psycopg" else 2)
    assert list(page) == shas
    assert [page[sha] for sha in shas] == blobs


def test_get_page_stops_at_its_byte_budget_but_always_reads_one(engine: Engine) -> None:
    blobs = [os.urandom(1000) for _ in range(5)]
    with session_scope(engine) as s:
        shas = [blobstore.put(s, b, BlobKind.UPDATE) for b in blobs]
        assert list(blobstore.get_page(s, shas, max_bytes=2500)) == shas[:2]
        assert list(blobstore.get_page(s, shas, max_bytes=10)) == shas[:1]
        assert list(blobstore.get_page(s, shas[3:], max_bytes=5000)) == shas[3:]
        assert blobstore.get_page(s, [], max_bytes=10) == {}


def test_get_page_reports_a_bad_blob_without_failing_the_others(engine: Engine) -> None:
    good, torn, bent = os.urandom(3000), os.urandom(3000), os.urandom(3000)
    with session_scope(engine) as s:
        good_sha = blobstore.put(s, good, BlobKind.UPDATE, chunk_size=1024)
        torn_sha = blobstore.put(s, torn, BlobKind.UPDATE, chunk_size=1024)
        bent_sha = blobstore.put(s, bent, BlobKind.UPDATE, chunk_size=1024)
        s.execute(delete(BlobChunk).where(BlobChunk.sha256 == torn_sha, BlobChunk.idx == 1))
        s.execute(
            update(BlobChunk)
            .where(BlobChunk.sha256 == bent_sha, BlobChunk.idx == 2)
            .values(data=b"x" * (3000 - 2048))
        )
    missing = "0" * 64
    with session_scope(engine) as s:
        page = blobstore.get_page(s, [torn_sha, missing, good_sha, bent_sha], 1 << 20)
    assert page[good_sha] == good
    assert isinstance(page[torn_sha], blobstore.BlobCorrupt)
    assert "chunk 1 of 3 is missing" in str(page[torn_sha])
    assert isinstance(page[bent_sha], blobstore.BlobCorrupt)
    assert isinstance(page[missing], blobstore.BlobNotFound)
    with session_scope(engine) as s, pytest.raises(ValueError, match="SHA-256"):
        blobstore.get_page(s, ["not-a-hash"], 10)
