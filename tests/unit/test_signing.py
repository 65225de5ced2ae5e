"""Signatures on what the orchestrator tells devices (protocol/signing.py): what a
signature binds, and that every other context, key or byte is refused."""

from __future__ import annotations

import pytest

from protocol import chunking, signing
from protocol.signing import (
    BROADCAST,
    SIGNATURE_HEADER,
    SignatureError,
    Signer,
    Verifier,
    decode_public_key,
    generate_key,
    recipient_for,
)

SIGNER = Signer(generate_key()[0])
VERIFIER = Verifier(SIGNER.public_key)
BODY = b'{"type":"event","kind":"update.accepted"}'


def _headers(kind: str = "event", run: str = "run-1", to: str = "c-1") -> dict[str, object]:
    return SIGNER.signed_headers(kind, run, to, BODY)


def test_a_signed_message_verifies_in_its_own_context() -> None:
    VERIFIER.verify("event", "run-1", "c-1", BODY, _headers())


@pytest.mark.parametrize(
    ("kind", "run", "to", "body"),
    [
        ("round", "run-1", "c-1", BODY),  # another kind
        ("event", "run-2", "c-1", BODY),  # another run
        ("event", "run-1", "c-2", BODY),  # replayed to another device
        ("event", "run-1", BROADCAST, BODY),  # passed off as a broadcast
        ("event", "run-1", "c-1", BODY + b" "),  # one byte more
    ],
)
def test_any_other_context_or_byte_is_refused(kind: str, run: str, to: str, body: bytes) -> None:
    with pytest.raises(SignatureError, match="not signed by the pinned"):
        VERIFIER.verify(kind, run, to, body, _headers())


def test_another_key_an_unsigned_and_a_malformed_signature_are_refused() -> None:
    other = Signer(generate_key()[0])
    with pytest.raises(SignatureError, match="not signed by the pinned"):
        VERIFIER.verify(
            "event", "run-1", "c-1", BODY, other.signed_headers("event", "run-1", "c-1", BODY)
        )
    with pytest.raises(SignatureError, match="unsigned event"):
        VERIFIER.verify("event", "run-1", "c-1", BODY, {})
    for bad in ("!!!", "QUJD", "A" * 88):
        with pytest.raises(SignatureError, match=r"malformed|not signed"):
            VERIFIER.verify("event", "run-1", "c-1", BODY, {SIGNATURE_HEADER: bad})


def test_a_model_chunk_signature_covers_its_headers_but_not_foreign_ones() -> None:
    blob = bytes(range(256)) * 40
    chunk = chunking.split(blob, 4096)[1]
    headers = {**chunking.to_headers(chunk), "x-fedmq-envelope": '{"model_version":3}'}
    signed = SIGNER.signed_headers(signing.MODEL_KIND, "run-1", BROADCAST, chunk.data, headers)
    # What a broker adds (x-death, ...) is not ours and does not matter.
    VERIFIER.verify(signing.MODEL_KIND, "run-1", BROADCAST, chunk.data, {**signed, "x-death": 1})
    for name, value in (
        ("x-fedmq-chunk-index", 0),
        ("x-fedmq-envelope", '{"model_version":4}'),
        ("x-fedmq-extra", "1"),
    ):
        with pytest.raises(SignatureError):
            VERIFIER.verify(
                signing.MODEL_KIND, "run-1", BROADCAST, chunk.data, {**signed, name: value}
            )


def test_broadcast_kinds_are_signed_for_the_run_and_the_rest_for_the_device() -> None:
    assert recipient_for("round", "c-1") == recipient_for("model", "c-1") == BROADCAST
    assert recipient_for("event", "c-1") == recipient_for("registered", "c-1") == "c-1"


def test_keys_are_32_bytes_of_base64() -> None:
    assert len(decode_public_key(SIGNER.public_key)) == 32
    for bad in ("", "not base64!", "QUJD"):
        with pytest.raises(SignatureError):
            decode_public_key(bad)
    with pytest.raises(ValueError):
        signing.signed_bytes("event", "run\0x", "c-1", BODY)


def test_a_verified_broadcast_vouches_for_nothing_else() -> None:
    """Broadcasts verified once are remembered by this process (every device of an
    embedded fleet gets the same ones): a remembered signature still refuses any other
    byte, context or key, and a refused one is never remembered."""
    ann = b'{"type":"round","round":7}'
    headers = SIGNER.signed_headers("round", "run-1", BROADCAST, ann)
    for _ in range(2):  # the second is answered from what the first verified
        VERIFIER.verify("round", "run-1", BROADCAST, ann, headers)
        Verifier(SIGNER.public_key).verify("round", "run-1", BROADCAST, ann, headers)
    for kind, run, body in (("round", "run-1", ann + b" "), ("round", "run-2", ann)):
        with pytest.raises(SignatureError, match="not signed by the pinned"):
            VERIFIER.verify(kind, run, BROADCAST, body, headers)
    other = Verifier(Signer(generate_key()[0]).public_key)
    with pytest.raises(SignatureError, match="not signed by the pinned"):
        other.verify("round", "run-1", BROADCAST, ann, headers)
    forged = {SIGNATURE_HEADER: headers[SIGNATURE_HEADER]}
    fake = b'{"type":"round","round":8}'
    for _ in range(2):
        with pytest.raises(SignatureError, match="not signed by the pinned"):
            VERIFIER.verify("round", "run-1", BROADCAST, fake, forged)
