"""Every wire message round-trips; anything else is refused with a reason."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import sealing
from protocol.codec import Encoding
from protocol.messages import (
    MESSAGE_TYPES,
    ClientState,
    Command,
    CommandAction,
    Envelope,
    Event,
    Heartbeat,
    MessageError,
    ModelMeta,
    PeerKeys,
    Register,
    Registered,
    RevealedShare,
    RoundAnnouncement,
    SecAggInbox,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
    Signal,
    UpdateMeta,
    encode_message,
    parse_as,
    parse_message,
)
from protocol.messages import Encoding as MessageEncoding

SHA = "ab" * 32
MAC = "cd" * 32
PUB = sealing.new_keypair()[1]
BOX = sealing.seal("t" * 32, PUB, b"example")


def examples() -> list[Envelope]:
    deadline = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=5)
    return [
        Register(
            run_id="run1",
            display_name="phone of ana",
            reply_key="nonce123",
            device_info={"cores": 4, "os": "android"},
            reply_pub=PUB,
        ),
        Registered(run_id="run1", client_id="c0ffee", reply_key="nonce123", sealed_token=BOX),
        Signal(run_id="run1", client_id="c0ffee", mac=MAC, state=ClientState.READY),
        Heartbeat(run_id="run1", client_id="c0ffee", mac=MAC),
        Command(run_id="run1", action=CommandAction.AUTORUN, rounds=3, mac=MAC),
        RoundAnnouncement(
            run_id="run1",
            round=2,
            model_version=1,
            model_sha256=SHA,
            model_bytes=1234,
            deadline=deadline,
            selected=["a", "b"],
            train_config={"epochs": 1, "lr": 0.05},
        ),
        UpdateMeta(
            run_id="run1",
            client_id="c0ffee",
            round=2,
            mac=MAC,
            base_model_version=1,
            num_samples=300,
            encoding="bf16",
            blob_sha256=SHA,
            blob_bytes=99,
            metrics={"loss": 0.3, "accuracy": 0.9},
        ),
        ModelMeta(
            run_id="run1", round=2, model_version=2, blob_sha256=SHA, blob_bytes=5, encoding="bf16"
        ),
        Event(run_id="run1", kind="round.opened", round=2, detail={"selected": 5}),
        *secagg_examples(),
    ]


def secagg_examples() -> list[Envelope]:
    keys = PeerKeys(c_pub=PUB, s_pub=sealing.new_keypair()[1], num_samples=30)
    box = "A" * 60
    return [
        SecAggKeys(run_id="run1", client_id="a", round=2, keys=keys, mac=MAC),
        SecAggRoster(
            run_id="run1",
            round=2,
            keys={"a": keys, "b": keys, "c": keys},
            graph_seed=SHA,
            degree=2,
            threshold=2,
            clip=4.0,
            scale=1000,
        ),
        SecAggShares(run_id="run1", client_id="a", round=2, boxes={"b": box}, mac=MAC),
        SecAggInbox(run_id="run1", client_id="b", round=2, boxes={"a": box}),
        SecAggUnmask(run_id="run1", round=2, survivors=["a", "b"], dropped=["c"]),
        SecAggReveal(
            run_id="run1",
            client_id="a",
            round=2,
            mac=MAC,
            shares={"b": RevealedShare(kind="b", share="0" * 132)},
        ),
    ]


@pytest.mark.parametrize(
    ("cls", "fields", "why"),
    [
        (SecAggUnmask, {"survivors": ["a", "b"], "dropped": ["b"]}, "both a survivor and"),
        (SecAggShares, {"client_id": "a", "boxes": {"a": "A" * 60}}, "no share box to itself"),
        (
            SecAggRoster,
            {"keys": {}, "graph_seed": SHA, "degree": 1, "threshold": 1, "clip": 1.0, "scale": 1},
            "keys",
        ),
        (
            SecAggReveal,
            {"client_id": "a", "shares": {"b": {"kind": "both", "share": "0"}}},
            "kind",
        ),
    ],
)
def test_secagg_messages_refuse_what_breaks_the_protocol(
    cls: type[Envelope], fields: dict[str, object], why: str
) -> None:
    raw = json.dumps(
        {
            "schema_version": 1,
            "type": cls.model_fields["type"].default,
            "run_id": "run1",
            "round": 2,
            **fields,
        }
    )
    with pytest.raises(MessageError, match=why):
        parse_message(raw)


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in examples()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", examples(), ids=lambda m: m.type)
def test_every_message_round_trips_through_json(msg: Envelope) -> None:
    back = parse_message(encode_message(msg))
    assert back == msg
    assert type(back) is type(msg)


@pytest.mark.parametrize("msg", examples(), ids=lambda m: m.type)
def test_every_message_carries_the_envelope_fields(msg: Envelope) -> None:
    obj = json.loads(encode_message(msg))
    for key in (
        "schema_version",
        "type",
        "run_id",
        "client_id",
        "round",
        "message_id",
        "timestamp",
    ):
        assert key in obj


def test_message_ids_are_unique_by_default() -> None:
    ids = {Heartbeat(run_id="r", client_id="c").message_id for _ in range(100)}
    assert len(ids) == 100


def _signal_obj(**over: object) -> dict[str, object]:
    obj = json.loads(encode_message(examples()[2]))
    obj.update(over)
    return obj


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'"text"', "expected a JSON object"),
        (json.dumps(_signal_obj(schema_version=2)).encode(), "unsupported schema_version 2"),
        (json.dumps(_signal_obj(schema_version=None)).encode(), "unsupported schema_version"),
        (json.dumps(_signal_obj(type="telepathy")).encode(), "unknown message type"),
        (json.dumps(_signal_obj(state="sleeping")).encode(), "state"),
        (json.dumps(_signal_obj(run_id="a.b")).encode(), "run_id"),
        (json.dumps(_signal_obj(round=-1)).encode(), "round"),
        (json.dumps(_signal_obj(timestamp="2026-01-01T00:00:00")).encode(), "timezone"),
        (json.dumps(_signal_obj(extra_field=1)).encode(), "extra_field"),
        (json.dumps(_signal_obj(mac="short")).encode(), "mac"),
        (json.dumps(_signal_obj(token="t" * 32)).encode(), "token"),  # no longer on the wire
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        parse_message(data)


def test_a_blob_encoding_is_the_codecs_own_type_and_travels_as_its_value() -> None:
    assert MessageEncoding is Encoding  # one type from the codec to the wire
    update = next(m for m in examples() if isinstance(m, UpdateMeta))
    wire = json.loads(update.to_json())
    assert wire["encoding"] == "bf16"
    back = parse_as(json.dumps({**wire, "encoding": "int8"}), UpdateMeta)
    assert back.encoding is Encoding.INT8
    with pytest.raises(MessageError, match="encoding"):
        parse_as(json.dumps({**wire, "encoding": "fp64"}), UpdateMeta)


def test_oversized_messages_are_refused_before_parsing() -> None:
    with pytest.raises(MessageError, match="larger than the limit"):
        parse_message(b" " * 2000, max_bytes=1000)


def test_commands_need_their_arguments() -> None:
    for obj in (
        {"action": "autorun"},
        {"action": "kick"},
    ):
        data = json.dumps(
            {"schema_version": 1, "type": "command", "run_id": "r", "mac": MAC, **obj}
        )
        with pytest.raises(MessageError, match="needs"):
            parse_message(data)


def test_parse_as_refuses_the_wrong_kind_of_message() -> None:
    data = encode_message(examples()[3])
    assert isinstance(parse_as(data, Heartbeat), Heartbeat)
    with pytest.raises(MessageError, match="expected a signal message, got heartbeat"):
        parse_as(data, Signal)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_never_escape_as_anything_but_message_error(data: bytes) -> None:
    with contextlib.suppress(MessageError):
        parse_message(data)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "schema_version",
                "type",
                "run_id",
                "client_id",
                "round",
                "mac",
                "state",
                "detail",
                "timestamp",
            ]
        ),
        st.none()
        | st.integers()
        | st.text(max_size=20)
        | st.floats()
        | st.lists(st.integers(), max_size=3),
    )
)
def test_arbitrary_envelopes_never_escape_as_anything_but_message_error(obj: dict) -> None:
    obj.setdefault("schema_version", 1)
    with contextlib.suppress(MessageError):
        parse_message(json.dumps(obj))
