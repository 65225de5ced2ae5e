"""Messages are authenticated by an HMAC under the sender's secret, never by the secret; a
registration's token travels sealed to the device's own key."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from protocol import auth, sealing
from protocol.messages import (
    ClientState,
    Command,
    CommandAction,
    Heartbeat,
    MessageError,
    Signal,
    UpdateMeta,
    parse_message,
)

TOKEN = "device-token-0123456789abcdef"
WINDOW = 900.0


def _signed() -> list[Signal | Heartbeat | Command | UpdateMeta]:
    return [
        auth.sign(Signal(run_id="r", client_id="c", state=ClientState.READY), TOKEN),
        auth.sign(Heartbeat(run_id="r", client_id="c"), TOKEN),
        auth.sign(Command(run_id="r", action=CommandAction.AUTORUN, rounds=2), TOKEN),
        auth.sign(
            UpdateMeta(
                run_id="r",
                client_id="c",
                round=1,
                base_model_version=0,
                num_samples=3,
                encoding="bf16",
                blob_sha256="ab" * 32,
                blob_bytes=9,
                metrics={"loss": 0.1, "n": 3, "ok": True, "tag": "é"},
            ),
            TOKEN,
        ),
    ]


@pytest.mark.parametrize("msg", _signed(), ids=lambda m: m.type)
def test_a_signed_message_checks_after_the_wire_and_never_carries_the_token(msg) -> None:
    data = msg.to_json()
    assert TOKEN.encode() not in data
    back = parse_message(data)
    # The messages are built at collection time, which may be long before this test runs.
    now = back.timestamp.timestamp()
    assert auth.check(back, auth.mac_key(TOKEN), now=now, window_s=WINDOW) is None


@pytest.mark.parametrize("msg", _signed(), ids=lambda m: m.type)
def test_any_changed_field_breaks_the_mac(msg) -> None:
    obj = json.loads(msg.to_json())
    for field, value in (("run_id", "other"), ("message_id", "f" * 32), ("round", 7)):
        changed = parse_message(json.dumps({**obj, field: value}))
        now = msg.timestamp.timestamp()
        reason = auth.check(changed, auth.mac_key(TOKEN), now=now, window_s=WINDOW)
        assert reason is not None and "MAC" in reason


def test_a_blob_digest_is_covered() -> None:
    meta = _signed()[3]
    forged = meta.model_copy(update={"blob_sha256": "cd" * 32})
    assert "bad MAC" in str(auth.check(forged, auth.mac_key(TOKEN), now=time.time(), window_s=1))


def test_wrong_key_stale_future_and_missing_are_refused_with_reasons() -> None:
    sig = _signed()[0]
    now = sig.timestamp.timestamp()
    key = auth.mac_key(TOKEN)
    assert auth.check(sig, auth.mac_key("another-token-0123456789"), now=now, window_s=WINDOW) == (
        "unknown client or bad MAC for c"
    )
    assert auth.check(sig, None, now=now, window_s=WINDOW) == "unknown client or bad MAC for c"
    assert "stale signal message from c" in str(auth.check(sig, key, now=now + 901, window_s=900))
    assert "ahead of this clock" in str(auth.check(sig, key, now=now - 901, window_s=900))
    bare = Signal(run_id="r", client_id="c", state=ClientState.READY)
    assert auth.check(bare, key, now=now, window_s=WINDOW) == "no MAC on a signal message from c"
    cmd = _signed()[2]
    assert auth.check(cmd, auth.mac_key("x" * 20), now=now, window_s=WINDOW) == "bad operator MAC"


def test_an_old_timestamp_cannot_be_refreshed_without_the_key() -> None:
    sig = _signed()[0]
    later = sig.model_copy(update={"timestamp": datetime.now(UTC) + timedelta(seconds=1)})
    assert "bad MAC" in str(auth.check(later, auth.mac_key(TOKEN), now=time.time(), window_s=9))


def test_the_key_is_what_the_database_stores_for_a_client() -> None:
    from db.queries import hash_token

    assert auth.mac_key(TOKEN) == bytes.fromhex(hash_token(TOKEN))


def test_a_sealed_token_opens_only_with_its_key_and_context() -> None:
    private, public = sealing.new_keypair()
    box = sealing.seal(TOKEN, public, b"ctx")
    assert TOKEN not in box
    assert sealing.unseal(box, private, b"ctx") == TOKEN
    other, _ = sealing.new_keypair()
    with pytest.raises(sealing.SealError):
        sealing.unseal(box, other, b"ctx")
    with pytest.raises(sealing.SealError):
        sealing.unseal(box, private, b"another registration")
    tampered = box[:-2] + ("A" if box[-2] != "A" else "B") + box[-1]
    with pytest.raises(sealing.SealError):
        sealing.unseal(tampered, private, b"ctx")
    with pytest.raises(sealing.SealError):
        sealing.unseal("!!", private, b"ctx")


def test_a_register_with_an_unusable_public_key_is_malformed() -> None:
    obj = {
        "schema_version": 1,
        "type": "register",
        "run_id": "r",
        "display_name": "d",
        "reply_key": "rk",
        "reply_pub": "00" * 32,  # a low-order point: no shared secret
    }
    with pytest.raises(MessageError, match="reply_pub"):
        parse_message(json.dumps(obj))
