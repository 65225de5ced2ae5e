"""The device's identity file: round trip, 0600, and every bad file ignored (not fatal)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devices.identity import forget_identity, load_identity, save_identity
from devices.wire import Identity
from protocol.signing import Signer, generate_key

IDENT = Identity("run-1", "0123456789abcdef0123456789abcdef", "a-token-of-twenty-chars", None)


def test_round_trip_private_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "d" / "id.json"
    save_identity(path, IDENT)
    assert load_identity(path, "run-1") == IDENT
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["id.json"]  # no temporary left
    own = Identity(IDENT.run_id, IDENT.client_id, IDENT.token, IDENT.client_id)
    save_identity(path, own)
    assert load_identity(path, "run-1") == own
    forget_identity(path)
    forget_identity(path)  # twice is fine
    assert load_identity(path, "run-1") is None


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        json.dumps({"run_id": "run-1", "client_id": "a.b", "token": "a-token-of-twenty-chars"}),
        json.dumps({"run_id": "run-1", "client_id": "c1", "token": "short"}),
        json.dumps({"run_id": "run-1", "client_id": "c1", "token": 7}),
        json.dumps({"run_id": "run-1", "client_id": "c1", "token": "a" * 20, "broker_user": "x y"}),
    ],
)
def test_a_bad_file_is_ignored(tmp_path: Path, content: str) -> None:
    path = tmp_path / "id.json"
    path.write_text(content)
    assert load_identity(path, "run-1") is None


def test_another_runs_identity_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    save_identity(path, IDENT)
    assert load_identity(path, "run-2") is None


def test_the_pinned_orchestrator_key_is_kept_and_a_bad_one_makes_the_file_unusable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "id.json"
    key = Signer(generate_key()[0]).public_key
    pinned = Identity(IDENT.run_id, IDENT.client_id, IDENT.token, None, key)
    save_identity(path, pinned)
    assert json.loads(path.read_text())["signing_key"] == key
    assert load_identity(path, "run-1") == pinned
    for bad in ("short", 7, "A" * 44):
        path.write_text(json.dumps({**json.loads(path.read_text()), "signing_key": bad}))
        assert load_identity(path, "run-1") is None
