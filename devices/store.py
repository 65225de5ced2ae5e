"""Global model versions as a device receives them: chunks in, checked weights out.

Chunks (headers ``x-fedmq-blob-*`` + ``x-fedmq-envelope`` = ``ModelMeta``) are reassembled
with ``chunking.Reassembler``, the blob's SHA-256 and size are checked against the
``ModelMeta``, and the blob is decoded with the device's limits against its own model's
tensor names, shapes and dtypes. Only the newest ``keep`` versions (by number) are held; the
chunks of a version already held are dropped unread.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from learning.params import Arrays
from protocol import chunking, enveloped
from protocol.codec import CodecError, DecodedBlob, DecodeLimits, TensorSpec, apply_delta, decode
from protocol.messages import ModelMeta

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model blob that cannot be used (bad chunk, hash, size, codec or spec)."""


class DecodedCache:
    """The newest decoded model blobs of this process, by SHA-256, limits and spec.

    An embedded fleet runs K devices in one process, and every one of them is sent the
    same global model each round: decoding it K times was a tenth of the devices' CPU at
    K = 100. The blob's hash is checked by each device before it asks, so a hit is the
    decode of exactly these bytes under exactly these checks. The arrays are made
    read-only: devices share them, and each copies what it loads into its own model.
    A device alone in its process holds what it would hold anyway (``size`` covers the
    versions a store keeps)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[Any, ...], DecodedBlob] = OrderedDict()

    def decode(
        self,
        blob: bytes,
        sha256: str,
        limits: DecodeLimits,
        expected: Mapping[str, TensorSpec] | None,
    ) -> DecodedBlob:
        spec = None if expected is None else tuple(sorted(expected.items()))
        key = (sha256, limits, spec)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        decoded = decode(blob, limits=limits, expected=expected)
        for array in decoded.tensors.values():
            if isinstance(array, np.ndarray):
                array.flags.writeable = False
        with self._lock:
            self._items[key] = decoded
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return decoded


DECODED = DecodedCache()


class ModelStore:
    def __init__(
        self,
        *,
        expected: Mapping[str, TensorSpec] | None = None,
        limits: DecodeLimits | None = None,
        keep: int = 2,
        timeout_s: float = 300.0,
    ) -> None:
        self.expected = dict(expected) if expected is not None else None
        self.limits = limits or DecodeLimits()
        self.keep = max(1, keep)
        self.versions: dict[int, Arrays] = {}
        self.sha256: dict[int, str] = {}  # of each held version's blob
        self._reassembler = chunking.Reassembler(
            max_blob_bytes=self.limits.max_compressed_bytes,
            max_buffered_bytes=2 * self.limits.max_compressed_bytes,
            max_partial_blobs=4,
            timeout_s=timeout_s,
        )

    def get(self, version: int) -> Arrays | None:
        return self.versions.get(version)

    def latest(self) -> int | None:
        return max(self.versions, default=None)

    def add_chunk(self, headers: Mapping[str, Any], body: bytes) -> int | None:
        """Take one chunk; returns the model version it completed, else None.

        Raises ``ModelError`` for a chunk or blob that cannot be used."""
        try:
            chunk, meta = enveloped.read(headers, body, ModelMeta, "model")
        except enveloped.EnvelopeError as e:
            raise ModelError(f"bad model chunk: {e}") from e
        if meta.model_version in self.versions or self._too_old(meta.model_version):
            return None
        try:
            blob = self._reassembler.add(chunk)
        except chunking.ChunkError as e:
            self._reassembler.discard(chunk.blob_id)
            raise ModelError(f"model {meta.model_version}: {e}") from e
        for expired in self._reassembler.expire():
            log.warning("dropped an incomplete model blob: %s", expired)
        if blob is None:
            return None
        self._complete(meta, blob)
        return meta.model_version

    def _too_old(self, version: int) -> bool:
        return len(self.versions) >= self.keep and version < min(self.versions)

    def _complete(self, meta: ModelMeta, blob: bytes) -> None:
        v = meta.model_version
        if len(blob) != meta.blob_bytes or hashlib.sha256(blob).hexdigest() != meta.blob_sha256:
            raise ModelError(f"model {v}: blob does not match its ModelMeta (size or sha256)")
        try:
            decoded = DECODED.decode(blob, meta.blob_sha256, self.limits, self.expected)
            if decoded.delta:  # a version sent as a delta against one the device holds
                base = self.versions.get(int(decoded.base_version or -1))
                if base is None:
                    raise ModelError(f"model {v}: delta against {decoded.base_version}, not held")
                weights = apply_delta(base, decoded)
            else:
                weights = decoded.tensors
        except (CodecError, ValueError) as e:
            raise ModelError(f"model {v}: {e}") from e
        self.versions[v], self.sha256[v] = weights, meta.blob_sha256
        for old in sorted(self.versions)[: -self.keep]:
            del self.versions[old], self.sha256[old]
