"""The REST gateway's routes against the real orchestrator (embedded): each paper route's
success and failure cases, and ``/api/v1``'s ETags and long-polls. A refused call answers
4xx with a JSON reason and leaves nothing behind (no blob, no staged chunk, nothing on the
bus for the orchestrator to refuse)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from db import blobstore
from db import queries as q
from db.models import Blob, Event, UploadChunk
from orchestrator.state import RoundPolicy
from protocol import topology
from protocol.codec import Encoding, encode
from protocol.messages import CommandAction
from tests.integration.gateway_env import MAX_UPLOAD, OPERATOR, GatewayEnv, gateway_env

pytestmark = [pytest.mark.timeout(60)]

OP = {"Authorization": f"Bearer {OPERATOR}"}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[GatewayEnv]:
    with gateway_env(tmp_path) as e:
        yield e


def _reason(res: Any, status: int) -> str:
    assert res.status_code == status, (res.status_code, res.text)
    body = res.json()
    assert body["status"] == status and body["reason"]
    return str(body["reason"])


def _update(env: GatewayEnv, scale: float = 0.01) -> bytes:
    new = {k: v + scale for k, v in env.base.items()}
    return encode(new, Encoding.BF16, base=env.base, base_version="0")


def _stored(env: GatewayEnv) -> tuple[int, int, int]:
    """Blobs, staged chunks and refused updates: what a refused upload must not change."""

    def count(s: Any) -> tuple[int, int, int]:
        return (
            s.scalar(select(func.count()).select_from(Blob)),
            s.scalar(select(func.count()).select_from(UploadChunk)),
            s.scalar(select(func.count()).select_from(Event).where(Event.kind == "update.refused")),
        )

    return env.read(count)


def _open_round_with(env: GatewayEnv, *auths: dict[str, str]) -> None:
    for auth in auths:
        assert (
            env.http.post("/client/signal", json={"state": "ready"}, headers=auth).status_code
            == 202
        )
    res = env.http.post("/client/autorun/1", headers=OP)
    assert res.status_code == 202 and res.json()["status"] == "sent"
    env.wait(lambda: env.round_state(1) == "open", "round 1 to open")


# --- POST /client -------------------------------------------------------------------------


def test_register_returns_a_client_id_and_a_token_that_the_orchestrator_knows(
    env: GatewayEnv,
) -> None:
    res = env.http.post("/client", json={"display_name": "phone", "device_info": {"os": "web"}})
    assert res.status_code == 201
    body = res.json()
    assert body["run_id"] == env.run_id and len(body["token"]) >= 16
    client = env.read(lambda s: q.get_client(s, body["client_id"]))
    assert client is not None and client.token_hash == q.hash_token(body["token"])
    assert client.display_name == "phone" and client.device_info == {"os": "web"}


def test_register_refuses_an_unknown_run_and_a_bad_body(env: GatewayEnv) -> None:
    assert "unknown run" in _reason(env.http.post("/client", json={"run_id": "nope"}), 404)
    _reason(env.http.post("/client", json={"display_name": ""}), 422)
    _reason(env.http.post("/client", json={"run_id": "a.b"}), 422)
    _reason(
        env.http.post(
            "/client", content=b"{not json", headers={"Content-Type": "application/json"}
        ),
        422,
    )
    assert "unknown run" in _reason(env.http.post("/api/v1/runs/nope/clients", json={}), 404)


# --- GET /client and GET /transmitter -------------------------------------------------------


def test_initial_and_global_parameters_are_the_stored_blobs_with_etags(env: GatewayEnv) -> None:
    _, auth = env.register()
    v0 = env.read(lambda s: blobstore.get(s, q.get_model_version(s, env.run_id, 0).blob_sha))
    res = env.http.get("/client", headers=auth)
    assert res.status_code == 200 and res.content == v0
    assert res.headers["content-type"] == "application/octet-stream"
    assert res.headers["x-fedmq-model-version"] == "0"
    etag = res.headers["etag"]
    assert env.http.get("/client", headers={**auth, "If-None-Match": etag}).status_code == 304
    latest = env.http.get("/transmitter", headers=auth)
    assert latest.status_code == 200 and latest.content == v0  # no round yet: version 0
    again = env.http.get("/transmitter", headers={**auth, "If-None-Match": latest.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert env.http.get(f"/api/v1/runs/{env.run_id}/models/0", headers=auth).content == v0


def test_parameters_need_a_known_token(env: GatewayEnv) -> None:
    assert "missing" in _reason(env.http.get("/transmitter"), 401)
    bad = {"Authorization": "Bearer " + "x" * 40}
    assert "unknown" in _reason(env.http.get("/client", headers=bad), 401)
    _reason(env.http.get("/transmitter", headers={"Authorization": "Basic abc"}), 401)
    _, auth = env.register()
    assert "no model version" in _reason(
        env.http.get(f"/api/v1/runs/{env.run_id}/models/9", headers=auth), 404
    )


# --- POST /client/signal, DELETE /client/{id} -----------------------------------------------


def test_signals_move_the_client_and_refuse_bad_callers(env: GatewayEnv) -> None:
    cid, auth = env.register()
    res = env.http.post("/client/signal", json={"state": "ready"}, headers=auth)
    assert res.status_code == 202 and res.json()["message_id"]
    env.wait(lambda: env.client_state(cid) == "ready", "the client to be ready")
    hb = env.http.post(f"/api/v1/clients/{cid}/heartbeat", headers=auth)
    assert hb.status_code == 202
    _reason(env.http.post("/client/signal", json={"state": "dancing"}, headers=auth), 422)
    _reason(env.http.post("/client/signal", json={"state": "ready"}), 401)
    assert "operator" in _reason(
        env.http.post("/client/signal", json={"state": "ready"}, headers=OP), 403
    )
    _, other_auth = env.register("other")
    _reason(
        env.http.post(f"/api/v1/clients/{cid}/signal", json={"state": "ready"}, headers=other_auth),
        403,
    )
    _reason(env.http.post("/api/v1/clients/nobody/heartbeat", headers=auth), 404)


def test_a_client_leaves_with_its_token_and_the_operator_kicks(env: GatewayEnv) -> None:
    a, auth_a = env.register("a")
    b, _ = env.register("b")
    assert "another client" in _reason(env.http.delete(f"/client/{b}", headers=auth_a), 403)
    assert "unknown client" in _reason(env.http.delete("/client/nobody", headers=OP), 404)
    assert env.http.delete(f"/client/{a}", headers=auth_a).status_code == 202
    env.wait(lambda: env.client_state(a) == "offline", "a to leave")
    assert env.http.delete(f"/client/{b}", headers=OP).status_code == 202
    env.wait(lambda: env.client_state(b) == "offline", "b to be kicked")
    _reason(env.http.delete(f"/client/{b}", headers={"Authorization": "Bearer " + "y" * 30}), 401)


# --- POST /client/autorun/{rounds}, DELETE /client/autorun ----------------------------------


def test_autorun_needs_the_operator_token(env: GatewayEnv) -> None:
    _, auth = env.register()
    assert "operator" in _reason(env.http.post("/client/autorun/3", headers=auth), 403)
    _reason(env.http.post("/client/autorun/3"), 401)
    _reason(env.http.post("/client/autorun/0", headers=OP), 422)
    _reason(env.http.post("/client/autorun/3", params={"run_id": "nope"}, headers=OP), 404)
    assert env.http.post("/client/autorun/3", headers=OP).status_code == 202
    env.wait(
        lambda: env.read(lambda s: q.get_run(s, env.run_id).autorun_remaining) is not None,
        "autorun to be on",
    )
    _reason(env.http.delete("/client/autorun", headers=auth), 403)
    assert env.http.delete("/client/autorun", headers=OP).status_code == 202
    env.wait(
        lambda: env.read(lambda s: q.get_run(s, env.run_id).autorun_remaining) is None,
        "autorun to be off",
    )


# --- POST /transmitter/{name} ---------------------------------------------------------------


def test_an_upload_is_checked_then_counted_like_an_amqp_update(env: GatewayEnv) -> None:
    cid, auth = env.register()
    _open_round_with(env, auth)
    before = _stored(env)
    path = f"/transmitter/{cid}"
    params = {"num_samples": 10, "round": 1}
    # Refused, each with its reason, and nothing is stored or sent:
    _reason(env.http.post(path, params=params, content=b"garbage" * 10, headers=auth), 422)
    flipped = bytearray(_update(env))
    flipped[-8] ^= 0xFF  # inside the zstd frame: its checksum no longer matches
    _reason(env.http.post(path, params=params, content=bytes(flipped), headers=auth), 422)
    wrong = encode({"other": np.zeros(3, np.float32)}, Encoding.FP32)
    _reason(env.http.post(path, params=params, content=wrong, headers=auth), 422)
    big = b"\0" * (MAX_UPLOAD + 1)
    assert "limit" in _reason(env.http.post(path, params=params, content=big, headers=auth), 413)
    bad_length = {**auth, "content-length": "12x"}
    assert "not a byte count" in _reason(
        env.http.post(path, params=params, content=_update(env), headers=bad_length), 400
    )
    _reason(env.http.post(path, params=params, content=b"", headers=auth), 422)
    _reason(env.http.post(path, params={"round": 1}, content=_update(env), headers=auth), 422)
    _reason(env.http.post(path, params=params, content=_update(env)), 401)
    _reason(env.http.post(path, params=params, content=_update(env), headers=OP), 403)
    _reason(
        env.http.post("/transmitter/nobody", params=params, content=_update(env), headers=auth), 404
    )
    _reason(
        env.http.post(path, params={**params, "metrics": "[1"}, content=_update(env), headers=auth),
        422,
    )
    _reason(
        env.http.post(path, params={**params, "round": 7}, content=_update(env), headers=auth), 404
    )
    assert _stored(env) == before and env.round_state(1) == "open"
    # Accepted: on the bus as chunks, stored and counted by the orchestrator.
    metrics = '{"loss": 0.5, "accuracy": 0.9}'
    res = env.http.post(
        path, params={**params, "metrics": metrics}, content=_update(env), headers=auth
    )
    assert res.status_code == 202, res.text
    assert res.json()["status"] == "sent" and res.json()["round"] == 1
    env.wait(lambda: env.round_state(1) not in ("open", None), "round 1 to close")
    parts = env.read(lambda s: q.list_participations(s, q.get_round(s, env.run_id, 1).id))
    assert [(p.client_id, str(p.state), p.num_samples, p.loss) for p in parts] == [
        (cid, "update", 10, 0.5)
    ]
    # The same upload again: already counted, nothing more happens.
    dup = env.http.post(path, params=params, content=_update(env), headers=auth)
    assert dup.status_code == 202 and dup.json()["status"] == "duplicate"


def test_an_upload_for_a_closed_round_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    with gateway_env(tmp_path, RoundPolicy(min_clients=2, quorum_fraction=0.5)) as env:
        a, auth_a = env.register("a")
        b, auth_b = env.register("b")
        _open_round_with(env, auth_a, auth_b)
        res = env.http.post(
            f"/api/v1/clients/{a}/updates",
            params={"num_samples": 5},
            content=_update(env),
            headers=auth_a,
        )
        assert res.status_code == 202, res.text
        env.wait(
            lambda: env.read(lambda s: q.get_round(s, env.run_id, 1).received) == 1, "a's update"
        )
        env.command(CommandAction.CLOSE_ROUND)
        env.wait(lambda: env.round_state(1) in ("done", "failed"), "round 1 to finish")
        before = _stored(env)
        late = env.http.post(
            f"/transmitter/{b}",
            params={"num_samples": 5, "round": 1},
            content=_update(env),
            headers=auth_b,
        )
        assert "not open" in _reason(late, 409)
        no_round = env.http.post(
            f"/transmitter/{b}", params={"num_samples": 5}, content=_update(env), headers=auth_b
        )
        assert "no round is open" in _reason(no_round, 409)
        assert _stored(env) == before


# --- /api/v1: ETags and long-polls ----------------------------------------------------------


def test_round_etag_long_poll_and_messages(env: GatewayEnv) -> None:
    cid, auth = env.register()
    url = f"/api/v1/runs/{env.run_id}/round"
    first = env.http.get(url, headers=auth)
    assert first.status_code == 200 and first.json()["round"] is None
    assert first.json()["model_version"] == 0
    etag = first.headers["etag"]
    assert env.http.get(url, headers={**auth, "If-None-Match": etag}).status_code == 304
    nxt = f"/api/v1/runs/{env.run_id}/rounds/next"
    assert env.http.get(nxt, params={"after": 0, "wait": 0.2}, headers=auth).status_code == 204
    _open_round_with(env, auth)
    res = env.http.get(nxt, params={"after": 0, "wait": 5}, headers=auth)
    assert res.status_code == 200 and res.json()["round"] == 1 and res.json()["selected"] == [cid]
    changed = env.http.get(url, headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["state"] == "open"
    # The device queue, as an AMQP device would read it (model chunks left out):
    got: list[dict[str, Any]] = []
    for _ in range(20):
        got += env.http.get(
            f"/api/v1/clients/{cid}/messages", params={"wait": 0.5}, headers=auth
        ).json()["messages"]
        if any(m["type"] == "round" for m in got):
            break
    ann = next(m for m in got if m["type"] == "round")
    assert ann["round"] == 1 and ann["selected"] == [cid] and ann["model_version"] == 0
    _, other_auth = env.register("other")
    _reason(env.http.get(f"/api/v1/clients/{cid}/messages", headers=other_auth), 403)


def test_errors_are_json_for_unknown_routes_and_methods(env: GatewayEnv) -> None:
    _reason(env.http.get("/nowhere"), 404)
    _reason(env.http.put("/transmitter"), 405)
    assert env.http.get("/docs").status_code == 200
    assert "/transmitter/{name}" in env.http.get("/openapi.json").json()["paths"]


def test_what_the_gateway_puts_on_the_bus_never_carries_a_bearer_token(env: GatewayEnv) -> None:
    """A device's bearer token crosses only its own HTTP link: the registration, signals,
    the update and the operator's command the gateway forwards carry MACs, and the answer
    it got from the orchestrator carried the token sealed."""
    watch = "gw-eavesdrop"
    env.bus.declare(
        topology.Topology(
            queues=(topology.Queue(watch, dead_letter_exchange=None),),
            bindings=(
                topology.Binding(topology.SIGNALS_EXCHANGE, watch, "#"),
                topology.Binding(topology.UPDATES_EXCHANGE, watch, "#"),
                topology.Binding(topology.DEVICES_EXCHANGE, watch, "#"),
                topology.Binding(topology.CONTROL_EXCHANGE, watch, topology.CONTROL_ROUTING_KEY),
            ),
        )
    )
    cid, auth = env.register()
    _open_round_with(env, auth)
    assert env.http.post("/client/signal", json={"state": "heartbeat"}, headers=auth).status_code
    res = env.http.post(
        f"/transmitter/{cid}",
        params={"num_samples": 10, "round": 1},
        content=_update(env),
        headers=auth,
    )
    assert res.status_code == 202, res.text
    env.wait(lambda: env.round_state(1) not in ("open", None), "round 1 to close")
    captured = []
    while (d := env.bus.get(watch, timeout=0.2)) is not None:
        captured.append(d.body + repr(sorted(d.headers.items())).encode())
        d.ack()
    token = auth["Authorization"].removeprefix("Bearer ")
    kinds = b"".join(captured)
    for kind in (b'"type":"register"', b'"type":"registered"', b'"type":"signal"'):
        assert kind in kinds
    assert b"x-fedmq-envelope" in kinds and b'"type":"command"' in kinds
    for secret in (token, OPERATOR):
        for form in (secret, q.hash_token(secret)):
            assert not [c for c in captured if form.encode() in c], form


def test_secagg_stage_messages_are_the_callers_own_and_of_a_device_kind(env: GatewayEnv) -> None:
    """``POST /api/v1/clients/{id}/secagg`` relays only a device's own stage message."""
    cid, auth = env.register("a")
    other, _ = env.register("b")
    keys = {"c_pub": "11" * 32, "s_pub": "22" * 32, "num_samples": 5}
    msg = {"schema_version": 1, "type": "secagg_keys", "run_id": env.run_id,
           "client_id": cid, "round": 1, "keys": keys}  # fmt: skip
    path = f"/api/v1/clients/{cid}/secagg"
    res = env.http.post(path, json=msg, headers=auth)
    assert res.status_code == 202, res.text
    forged = {**msg, "client_id": other}
    assert "caller's own" in _reason(env.http.post(path, json=forged, headers=auth), 403)
    unmask = {"schema_version": 1, "type": "secagg_unmask", "run_id": env.run_id,
              "round": 1, "survivors": [cid], "dropped": []}  # fmt: skip
    assert "not a device's" in _reason(env.http.post(path, json=unmask, headers=auth), 422)
    bad = {**msg, "keys": {**keys, "c_pub": "zz"}}
    assert "invalid" in _reason(env.http.post(path, json=bad, headers=auth), 422)
    assert env.http.post(f"/api/v1/clients/{other}/secagg", json=msg, headers=auth).status_code in (
        403,
        404,
    )
