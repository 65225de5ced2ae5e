"""Tensor codec: a dict of tensors to compressed, checked bytes and back.

Safetensors-style container (JSON header + raw little-endian bytes, never pickle),
compressed with zstd; encodings fp32, bf16, fp16, int8 (per-channel scales) and top-k
sparse; optional byte-plane shuffling; deltas against a base model version. Decoding is
bounded by ``DecodeLimits`` and every failure raises ``CodecError``.
"""

from protocol.codec.api import DecodedBlob, apply_delta, decode, encode, peek_header, validate
from protocol.codec.arrays import TensorSpec, spec_of
from protocol.codec.bf16 import bf16_to_f32, f32_to_bf16
from protocol.codec.container import FORMAT_VERSION, MAGIC
from protocol.codec.encodings import Encoding
from protocol.codec.errors import CodecError
from protocol.codec.header import BlobHeader
from protocol.codec.limits import DecodeLimits

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "BlobHeader",
    "CodecError",
    "DecodeLimits",
    "DecodedBlob",
    "Encoding",
    "TensorSpec",
    "apply_delta",
    "bf16_to_f32",
    "decode",
    "encode",
    "f32_to_bf16",
    "peek_header",
    "spec_of",
    "validate",
]
