"""The orchestrator's signing key (orchestrator/keys.py) on SQLite and Postgres: made once,
the same for every process of one database (replicas, restarts), and only its public half
read by the gateway."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from db import migrations
from db.engine import make_engine, make_sessionmaker, session_scope
from db.queries.keys import KEY_NAME, get_public_key
from orchestrator.keys import SigningKeys
from protocol.signing import Verifier, encode_key

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_replicas_and_restarts_sign_with_one_key(db_url: str) -> None:
    migrations.upgrade(db_url)
    engines = [make_engine(db_url) for _ in range(3)]
    try:
        # Three "replicas" starting at once, each with its own engine: one key wins.
        processes = [SigningKeys(make_sessionmaker(e)) for e in engines]
        with ThreadPoolExecutor(3) as pool:
            keys = list(pool.map(lambda p: p.public_key, processes))
        assert len(set(keys)) == 1
        restarted = SigningKeys(make_sessionmaker(engines[0]))
        assert restarted.public_key == keys[0]
        # What one signs, a device that pinned any of them accepts.
        sig = processes[1].signer().signed_headers("round", "run-1", "*", b"{}")
        Verifier(keys[2]).verify("round", "run-1", "*", b"{}", sig)
        with session_scope(make_sessionmaker(engines[2])) as s:
            raw = get_public_key(s, KEY_NAME)
        assert raw is not None and encode_key(raw) == keys[0]
    finally:
        for e in engines:
            e.dispose()
