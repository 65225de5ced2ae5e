"""Bad input to every consumer of the orchestrator (signals, updates, commands) on the real
stack: a fixed corpus (malformed JSON, wrong schema versions, wrong types, spoofed tokens,
oversized bodies and headers, zstd bombs, tensors with wrong shapes/dtypes/NaN, chunk sets
with gaps or conflicting hashes) plus hypothesis-generated mutations of valid messages.

Every corpus message is dead-lettered with a reason (``x-fedmq-reason``) and recorded as an
event (the dashboard's event list), except what is by design acked and forgotten (a chunk set
with a gap waits for its reassembly timeout); and each consumer still processes a good
message afterwards. The corpus size is recorded in docs/reliability.md."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from db import queries as q
from db.models import ParticipationState
from orchestrator.state import RoundPolicy
from protocol import auth, chunking, topology
from protocol.bus.base import ORIGINAL_QUEUE_HEADER, REASON_HEADER
from protocol.codec import Encoding, encode
from protocol.messages import (
    ClientState,
    Command,
    CommandAction,
    Signal,
    UpdateMeta,
)
from tests.auth_helpers import register
from tests.faults.support import REPORT_ENV, make_update, wait_models, wait_ready
from tests.integration.lightclient import ENVELOPE_HEADER, LightClient
from tests.integration.orchestrator_harness import OPERATOR_TOKEN, Harness, harness
from tests.unit.test_codec_corpus import frame, pack, rebuilt, split

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

GENERATED = int(os.environ.get("FEDMQ_BAD_INPUT_EXAMPLES", "40"))  # per consumer
REFUSALS = ["signal.refused", "auth.rejected", "register.rejected", "update.refused"]

Published = tuple[str, str, bytes, dict[str, Any]]  # exchange, routing key, body, headers


# --- signals ----------------------------------------------------------------------------


def signal_corpus(h: Harness, good: LightClient, other: LightClient) -> list[Published]:
    assert good.client_id and good.token and other.token
    ready = Signal(run_id=h.run_id, client_id=good.client_id, state=ClientState.READY)
    sig = json.loads(auth.sign(ready, good.token).to_json())
    old = datetime.now(UTC) - timedelta(hours=2)
    ahead = datetime.now(UTC) + timedelta(hours=2)
    leave = Signal(run_id=h.run_id, client_id=good.client_id, state=ClientState.OFFLINE)

    def with_(**kw: Any) -> bytes:
        return json.dumps({**sig, **kw}).encode()

    def without(key: str) -> bytes:
        return json.dumps({k: v for k, v in sig.items() if k != key}).encode()

    bodies = [
        b"",
        b"{",
        b"\xff\xfe\x00garbage",
        b"null",
        b"[]",
        b"42",
        b'"a string"',
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        json.dumps({**sig, "pad": "x" * (2 << 20)}).encode(),  # over max_message_bytes
        without("schema_version"),
        with_(schema_version=0),
        with_(schema_version=2),
        with_(schema_version="1"),
        with_(schema_version=10**40),
        without("type"),
        with_(type="nope"),
        with_(type="update"),
        with_(type="command"),
        with_(state="flying"),
        json.dumps({**sig, "x\x00": 1}).encode(),  # quoted raw in the reason: NUL in JSONB
        with_(token=good.token),  # the old wire: a token instead of a MAC
        with_(mac=None),  # no MAC
        with_(mac="0" * 64),  # a wrong MAC
        with_(state="offline"),  # the body changed under its MAC
        auth.sign(leave, other.token).to_json(),  # MAC under another client's token
        with_(client_id=other.client_id),  # this client's MAC for another's id
        auth.sign(leave.model_copy(update={"timestamp": old}), good.token).to_json(),  # stale
        auth.sign(leave.model_copy(update={"timestamp": ahead}), good.token).to_json(),
        with_(client_id="no-such-client"),
        with_(run_id="no-such-run"),
        with_(message_id=""),
        with_(message_id="x" * 10_000),
        with_(timestamp="yesterday"),
        register("no-such-run", "x", "rk0")[0].to_json(),
    ]
    out = [(topology.SIGNALS_EXCHANGE, f"signal.bad{i}", b, {}) for i, b in enumerate(bodies)]
    # Huge and hostile headers on an otherwise well-formed but unauthorised message.
    big = {f"x-pad-{i}": "y" * 500 for i in range(100)}  # ~50 KB of headers
    out.append((topology.SIGNALS_EXCHANGE, "signal.badheaders", with_(mac="1" * 64), big))
    return out


# --- updates ----------------------------------------------------------------------------


def _chunks(
    h: Harness, meta: UpdateMeta, blob: bytes, *, size: int = 1 << 20, key: str | None = None
) -> list[Published]:
    key = key or topology.update_routing_key(meta.run_id, meta.round, meta.client_id)
    env = meta.model_dump_json()
    return [
        (topology.UPDATES_EXCHANGE, key, c.data, {**chunking.to_headers(c), ENVELOPE_HEADER: env})
        for c in chunking.split(blob, size)
    ]


def _hours_ago(hours: float) -> datetime:
    return datetime.now(UTC) - timedelta(hours=hours)


def _meta_for(c: LightClient, blob: bytes, *, token: str | None = "", **kw: Any) -> UpdateMeta:
    """``c``'s update envelope, signed under its token (or ``token``; None: unsigned)."""
    fields: dict[str, Any] = {
        "run_id": c.run_id,
        "client_id": c.client_id,
        "round": 1,
        "base_model_version": 0,
        "num_samples": 10,
        "encoding": "fp32",
        "is_delta": True,
        "blob_sha256": hashlib.sha256(blob).hexdigest(),
        "blob_bytes": len(blob),
        **kw,
    }
    meta = UpdateMeta(**fields)
    return meta if token is None else auth.sign(meta, token or c.token or "")


def update_corpus(h: Harness, good: LightClient, other: LightClient) -> list[list[Published]]:
    """Each entry: the messages of one bad update (one or more chunks)."""
    base = good.models[0]
    ok = make_update(good, 1, 0)
    key = topology.update_routing_key(h.run_id, 1, good.client_id)
    headers = {**chunking.to_headers(ok.chunks[0]), ENVELOPE_HEADER: ok.meta.model_dump_json()}
    env = json.loads(ok.meta.model_dump_json())

    def blob_update(blob: bytes) -> list[Published]:
        return _chunks(h, _meta_for(good, blob), blob)

    delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in base.items()}
    trained = {k: base[k] + delta[k] for k in base}
    plain = encode(trained, Encoding.FP32, shuffle=False, base=base, base_version="0")
    header, payload = split(plain)

    def nan_first(p: bytearray) -> None:
        p[0:4] = struct.pack("<f", float("nan"))

    nan = rebuilt(pack(header, frame(payload)), edit_payload=nan_first)
    bomb = pack(header, frame(bytes(64 << 20)))  # 64 MiB of zeros behind a small header
    wrong_shape = encode({k: np.zeros((3, 3), np.float32) for k in base}, Encoding.FP32)
    wrong_dtype = encode({k: np.zeros(v.shape, np.int32) for k, v in base.items()}, Encoding.FP32)
    missing = encode({"l1.weight": delta["l1.weight"]}, Encoding.FP32)
    # Conflicting hashes: two chunks under one blob id, each from a different blob.
    a, b = make_update(good, 1, 0, seed=11), make_update(good, 1, 0, seed=12)
    ca, cb = chunking.split(a.blob, 64, "conflict"), chunking.split(b.blob, 64, "conflict")
    half = len(ca) // 2
    conflicting = [
        *[
            (
                topology.UPDATES_EXCHANGE,
                key,
                c.data,
                {**chunking.to_headers(c), ENVELOPE_HEADER: a.meta.model_dump_json()},
            )
            for c in ca[:half]
        ],
        *[
            (
                topology.UPDATES_EXCHANGE,
                key,
                c.data,
                {**chunking.to_headers(c), ENVELOPE_HEADER: b.meta.model_dump_json()},
            )
            for c in cb[half:]
        ],
    ]
    return [
        [(topology.UPDATES_EXCHANGE, key, b"no headers at all", {})],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {ENVELOPE_HEADER: ok.meta.model_dump_json()},
            )
        ],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {**headers, chunking.CHUNK_INDEX_HEADER: 99},
            )
        ],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {**headers, chunking.CHUNK_COUNT_HEADER: -1},
            )
        ],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {**headers, chunking.BLOB_SHA256_HEADER: "zz"},
            )
        ],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {**headers, chunking.BLOB_SIZE_HEADER: 10**12},
            )
        ],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {k: v for k, v in headers.items() if k != ENVELOPE_HEADER},
            )
        ],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {**headers, ENVELOPE_HEADER: "{not json"},
            )
        ],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {**headers, ENVELOPE_HEADER: json.dumps({**env, "schema_version": 2})},
            )
        ],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {**headers, ENVELOPE_HEADER: json.dumps({**env, "x\x00": 1})},
            )
        ],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {**headers, ENVELOPE_HEADER: json.dumps({**env, "num_samples": 0})},
            )
        ],
        [
            (
                topology.UPDATES_EXCHANGE,
                key,
                ok.chunks[0].data,
                {**headers, ENVELOPE_HEADER: json.dumps({**env, "blob_sha256": "0" * 64})},
            )
        ],
        _chunks(h, ok.meta, ok.blob, key=topology.update_routing_key(h.run_id, 7, good.client_id)),
        _chunks(h, _meta_for(good, ok.blob, token=other.token), ok.blob),  # another's key
        _chunks(h, _meta_for(good, ok.blob, token=None), ok.blob),  # no MAC
        _chunks(h, _meta_for(good, ok.blob, timestamp=_hours_ago(2)), ok.blob),  # stale
        _chunks(h, _meta_for(good, ok.blob, round=5), ok.blob),  # a round that never was
        _chunks(h, _meta_for(good, ok.blob, base_model_version=9), ok.blob),
        blob_update(nan),
        blob_update(bomb),
        blob_update(wrong_shape),
        blob_update(wrong_dtype),
        blob_update(missing),
        blob_update(b"FMQT garbage that is not a blob"),
        conflicting,
    ]


def gap_update(good: LightClient) -> list[Published]:
    """Chunks 0 and 2 of 3: never completes, acked and staged until its timeout."""
    u = make_update(good, 1, 0, seed=13)
    cs = chunking.split(u.blob, (len(u.blob) + 2) // 3)
    assert len(cs) == 3
    key = topology.update_routing_key(u.meta.run_id, 1, u.meta.client_id)
    env = u.meta.model_dump_json()
    return [
        (topology.UPDATES_EXCHANGE, key, c.data, {**chunking.to_headers(c), ENVELOPE_HEADER: env})
        for c in (cs[0], cs[2])
    ]


# --- commands ---------------------------------------------------------------------------


def command_corpus(h: Harness) -> list[Published]:
    pause = Command(run_id=h.run_id, action=CommandAction.PAUSE)
    cmd = json.loads(auth.sign(pause, OPERATOR_TOKEN).to_json())
    stop = Command(run_id=h.run_id, action=CommandAction.STOP_AUTORUN)

    def with_(**kw: Any) -> bytes:
        return json.dumps({**cmd, **kw}).encode()

    bodies = [
        b"",
        b"{]",
        b"\x00\x01",
        b"[" * 100_000,
        with_(schema_version=3),
        with_(type="signal"),
        with_(action="self_destruct"),
        json.dumps({**cmd, "x\x00": 1}).encode(),
        with_(operator_token=OPERATOR_TOKEN),  # the old wire: the token itself
        with_(mac=None),
        with_(mac="0" * 64),
        with_(action="resume"),  # the body changed under its MAC
        with_(run_id="no-such-run"),
        auth.sign(stop, "fedmq-dev-operator-token").to_json(),  # the old source constant
        auth.sign(stop.model_copy(update={"timestamp": _hours_ago(2)}), OPERATOR_TOKEN).to_json(),
        with_(action="autorun", rounds=-1),
        with_(action="kick"),  # no target
        json.dumps({**cmd, "pad": "x" * (2 << 20)}).encode(),
    ]
    return [(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, b, {}) for b in bodies]


# --- generated ----------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


def mutations(template: dict[str, Any], n: int) -> list[bytes]:
    """``n`` hypothesis-generated mutations of a valid message: fields replaced by any JSON,
    removed or added, or the encoded bytes flipped."""
    out: list[bytes] = []

    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def collect(data: st.DataObject) -> None:
        msg = dict(template)
        for _ in range(data.draw(st.integers(1, 3))):
            key = data.draw(st.sampled_from(sorted(template)) | st.text(max_size=8))
            if key in msg and data.draw(st.booleans()):
                del msg[key]
            else:
                msg[key] = data.draw(JSON)
        raw = bytearray(json.dumps(msg).encode())
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), max_size=2)):
            raw[i] ^= data.draw(st.integers(1, 255))
        out.append(bytes(raw))

    collect()
    return out[-n:]


# --- the test ---------------------------------------------------------------------------


def _publish(h: Harness, items: list[Published]) -> None:
    for exchange, key, body, headers in items:
        h.bus.publish(exchange, key, body, headers=headers or None)


def _dead_letters(h: Harness) -> list[dict[str, Any]]:
    out = []
    while (d := h.bus.get(topology.DEAD_LETTER_QUEUE, timeout=0.5)) is not None:
        d.ack()
        out.append(dict(d.headers))
    return out


def _refusal_events(h: Harness) -> Counter[str]:
    def get(s: Session) -> Counter[str]:
        rows = q.list_events(s, None, kinds=[*REFUSALS, "command.result"], limit=10_000)
        return Counter(
            e.kind for e in rows if e.kind != "command.result" or not e.detail.get("accepted")
        )

    return h.read(get)


def test_every_consumer_refuses_bad_input_and_keeps_consuming(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    with harness(amqp_url, pg_url, tmp_path, worker=False) as h:
        h.create_run(RoundPolicy(min_clients=2, quorum_fraction=1.0, deadline_s=300))
        h.start_service()
        good = h.client("good", hold_updates=True)
        other = h.client("other", hold_updates=True)
        wait_ready(h, [good, other])
        h.command(CommandAction.AUTORUN, rounds=1)
        h.wait_round_state(1, {"open"}, 20)
        wait_models(h, [good, other], 0)
        assert not _dead_letters(h)

        signals = signal_corpus(h, good, other)
        updates = update_corpus(h, good, other)
        commands = command_corpus(h)
        sig_template = json.loads(
            auth.sign(
                Signal(run_id=h.run_id, client_id=good.client_id or "", state=ClientState.READY),
                "bad-token-0123456789",
            ).to_json()
        )
        cmd_template = json.loads(
            auth.sign(
                Command(run_id=h.run_id, action=CommandAction.PAUSE), "bad-token-0123456789"
            ).to_json()
        )
        generated_signals = mutations(sig_template, GENERATED)
        generated_commands = mutations(cmd_template, GENERATED)
        ok = make_update(good, 1, 0)
        generated_updates = [
            (
                topology.UPDATES_EXCHANGE,
                topology.update_routing_key(h.run_id, 1, good.client_id),
                ok.chunks[0].data,
                {
                    **chunking.to_headers(ok.chunks[0]),
                    ENVELOPE_HEADER: m.decode("utf-8", "replace"),
                },
            )
            for m in mutations(json.loads(ok.meta.model_dump_json()) | {"mac": "0" * 64}, GENERATED)
        ]

        _publish(h, signals)
        _publish(h, [(topology.SIGNALS_EXCHANGE, "signal.gen", b, {}) for b in generated_signals])
        for u in updates:
            _publish(h, u)
        _publish(h, gap_update(good))
        _publish(h, generated_updates)
        _publish(h, commands)
        _publish(
            h,
            [
                (topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, b, {})
                for b in generated_commands
            ],
        )

        # Each consumer still does its work: a registration, an update, a command.
        late = h.client("late-joiner", hold_updates=True)
        assert late.client_id
        ok.publish(h)
        other_ok = make_update(other, 1, 0)
        other_ok.publish(h)
        h.wait(
            lambda: h.round(1) is not None and h.round(1).state != "open", 30, "round 1 to close"
        )
        parts = {p.client_id: p for p in h.participations(1)}
        assert parts[good.client_id].state == ParticipationState.UPDATE
        assert parts[good.client_id].message_id == ok.meta.message_id
        assert parts[other.client_id].message_id == other_ok.meta.message_id
        pause = h.command(CommandAction.PAUSE)
        h.wait(
            lambda: any(e.message_id == pause.message_id for e in h.events("command.result")),
            20,
            "the good command's result",
        )

        dead = _dead_letters(h)
        by_queue = Counter(d.get(ORIGINAL_QUEUE_HEADER) for d in dead)
        assert all(d.get(REASON_HEADER) for d in dead), [
            d for d in dead if not d.get(REASON_HEADER)
        ]
        events = _refusal_events(h)
        report = {
            "corpus": {"signals": len(signals), "updates": len(updates), "commands": len(commands)},
            "generated": 3 * GENERATED,
            "dead_letters": dict(by_queue),
            "events": dict(events),
        }
        print(json.dumps(report, indent=1))
        signal_events = sum(events[k] for k in REFUSALS if k != "update.refused")
        assert by_queue[topology.SIGNALS_QUEUE] == len(signals) + GENERATED == signal_events
        assert by_queue[topology.CONTROL_QUEUE] == len(commands) + GENERATED
        assert events["command.result"] == len(commands) + GENERATED
        assert by_queue[topology.UPDATES_QUEUE] == events["update.refused"]
        assert by_queue[topology.UPDATES_QUEUE] >= len(updates) + GENERATED
        assert not any("handler error" in str(d.get(REASON_HEADER)) for d in dead), dead
        Path(tmp_path / "bad-input.json").write_text(json.dumps(report))
        _record(report)


def _record(report: dict[str, Any]) -> None:
    """The figures for docs/reliability.md (benchmarks/reliability.py)."""
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    corpus = report["corpus"]
    detail = (
        f"{sum(corpus.values())} hand-written corpus messages (signals {corpus['signals']}, "
        f"updates {corpus['updates']}, commands {corpus['commands']}) + "
        f"{report['generated']} hypothesis-generated mutations ({GENERATED} per consumer); "
        f"dead-lettered with a reason: {report['dead_letters']}; refusal events: "
        f"{report['events']}; every consumer processed a good message afterwards"
    )
    with Path(path).open("a") as f:
        f.write(json.dumps({"scenario": "bad input: consumers", "detail": detail}) + "\n")
