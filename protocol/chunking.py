"""Blobs larger than one message travel as chunks; a ``Reassembler`` puts them back together.

Each chunk carries the blob id, its index, the chunk count, the blob's total size and the
SHA-256 of the whole blob, as AMQP headers (strings and ints only); the body is the raw bytes.
The receiver accepts chunks in any order and any number of times (the bus delivers at least
once), verifies the hash when the blob is complete, and bounds what an untrusted sender can make
it hold: the size of one blob, the bytes buffered over all partial blobs, how many partial
blobs at once, and how long an incomplete blob may sit idle.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_COUNT = 1 << 20

BLOB_ID_HEADER = "x-fedmq-blob-id"
CHUNK_INDEX_HEADER = "x-fedmq-chunk-index"
CHUNK_COUNT_HEADER = "x-fedmq-chunk-count"
BLOB_SIZE_HEADER = "x-fedmq-blob-size"
BLOB_SHA256_HEADER = "x-fedmq-blob-sha256"

_BLOB_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ChunkError(ValueError):
    """A chunk that cannot be accepted, or a blob that cannot be completed."""

    def __init__(self, message: str, blob_id: str | None = None) -> None:
        super().__init__(message)
        self.blob_id = blob_id


@dataclass(frozen=True)
class Chunk:
    blob_id: str
    index: int
    count: int
    size: int  # of the whole blob
    sha256: str  # of the whole blob, lowercase hex
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _validate(self)


def _validate(c: Chunk) -> None:
    def fail(why: str) -> None:
        raise ChunkError(f"chunk {c.index} of blob {c.blob_id!r}: {why}", c.blob_id)

    if not isinstance(c.blob_id, str) or not _BLOB_ID.fullmatch(c.blob_id):
        raise ChunkError(f"blob id {c.blob_id!r} must be 1-128 characters of [A-Za-z0-9._:-]")
    for name in ("index", "count", "size"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(f"{name} {value!r} must be a non-negative int")
    if not 1 <= c.count <= MAX_CHUNK_COUNT:
        fail(f"count {c.count} must be within 1..{MAX_CHUNK_COUNT}")
    if c.index >= c.count:
        fail(f"index must be below the count {c.count}")
    # Every chunk but an empty blob's only one holds at least a byte.
    if c.count > max(1, c.size):
        fail(f"count {c.count} exceeds the blob size {c.size}")
    if not isinstance(c.sha256, str) or not _SHA256.fullmatch(c.sha256):
        fail("sha256 must be 64 lowercase hex digits")
    if not isinstance(c.data, bytes):
        fail("data must be bytes")
    if len(c.data) > c.size or (c.size > 0 and not c.data):
        fail(f"holds {len(c.data)} bytes of a {c.size}-byte blob")


def iter_chunks(
    blob: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, blob_id: str | None = None
) -> Iterator[Chunk]:
    """The chunks of ``blob``, made one at a time so a sender holds only one extra chunk."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ChunkError(f"chunk size {chunk_size!r} must be a positive int")
    view = memoryview(blob).cast("B")
    count = max(1, -(-len(view) // chunk_size))
    digest = hashlib.sha256(view).hexdigest()
    blob_id = uuid.uuid4().hex if blob_id is None else blob_id
    for index in range(count):
        data = bytes(view[index * chunk_size : (index + 1) * chunk_size])
        yield Chunk(blob_id, index, count, len(view), digest, data)


def split(
    blob: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, blob_id: str | None = None
) -> list[Chunk]:
    return list(iter_chunks(blob, chunk_size, blob_id))


def to_headers(chunk: Chunk) -> dict[str, str | int]:
    return {
        BLOB_ID_HEADER: chunk.blob_id,
        CHUNK_INDEX_HEADER: chunk.index,
        CHUNK_COUNT_HEADER: chunk.count,
        BLOB_SIZE_HEADER: chunk.size,
        BLOB_SHA256_HEADER: chunk.sha256,
    }


def is_chunk(headers: dict[str, Any] | None) -> bool:
    return headers is not None and BLOB_ID_HEADER in headers


def from_message(headers: dict[str, Any] | None, body: bytes) -> Chunk:
    """The chunk that a message's headers and body describe; ``ChunkError`` if they don't."""
    headers = headers or {}

    def text(name: str) -> str:
        value = headers.get(name)
        if isinstance(value, bytes):  # AMQP tables may hand strings back as bytes
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                raise ChunkError(f"header {name} is not ASCII") from None
        if not isinstance(value, str):
            raise ChunkError(f"header {name} must be a string, got {value!r}")
        return value

    def number(name: str) -> int:
        value = headers.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ChunkError(f"header {name} must be an int, got {value!r}")
        return value

    return Chunk(
        blob_id=text(BLOB_ID_HEADER),
        index=number(CHUNK_INDEX_HEADER),
        count=number(CHUNK_COUNT_HEADER),
        size=number(BLOB_SIZE_HEADER),
        sha256=text(BLOB_SHA256_HEADER),
        data=bytes(body),
    )


@dataclass
class _Partial:
    first: Chunk  # the count, size and sha256 that every later chunk must agree with
    parts: dict[int, bytes]
    received: int  # bytes
    touched: float


class Reassembler:
    """Collects chunks into blobs; thread-safe.

    ``add`` returns the blob when its last missing chunk arrives and None otherwise; a chunk of
    a recently completed blob is a harmless duplicate and also gives None. An incomplete blob
    expires ``timeout_s`` after its latest chunk: ``expire()`` drops it and reports it.
    """

    def __init__(
        self,
        *,
        max_blob_bytes: int = 512 * 1024 * 1024,
        max_buffered_bytes: int = 1024 * 1024 * 1024,
        max_partial_blobs: int = 64,
        timeout_s: float = 300.0,
        remember_completed: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_blob_bytes = max_blob_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.max_partial_blobs = max_partial_blobs
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._partials: dict[str, _Partial] = {}
        self._buffered = 0
        self._completed: OrderedDict[str, tuple[int, int, str]] = OrderedDict()
        self._remember = remember_completed
        self._expired: list[ChunkError] = []  # dropped to make room, reported by expire()

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    @property
    def partial_blobs(self) -> int:
        return len(self._partials)

    def add(self, chunk: Chunk) -> bytes | None:
        with self._lock:
            return self._add(chunk)

    def _add(self, c: Chunk) -> bytes | None:
        if c.size > self.max_blob_bytes:
            raise ChunkError(
                f"blob {c.blob_id!r} claims {c.size} bytes, over the cap of {self.max_blob_bytes}",
                c.blob_id,
            )
        done = self._completed.get(c.blob_id)
        if done is not None:
            if done != (c.count, c.size, c.sha256):
                raise ChunkError(
                    f"chunk {c.index} contradicts completed blob {c.blob_id!r}", c.blob_id
                )
            return None
        p = self._partial_for(c)
        known = p.parts.get(c.index)
        if known is not None:
            if known != c.data:
                raise ChunkError(
                    f"chunk {c.index} of blob {c.blob_id!r} arrived twice with different content",
                    c.blob_id,
                )
            p.touched = self._clock()
            return None
        if p.received + len(c.data) > c.size:
            raise ChunkError(f"blob {c.blob_id!r}: chunks exceed its size of {c.size}", c.blob_id)
        if self._buffered + len(c.data) > self.max_buffered_bytes:
            raise ChunkError(
                f"buffering chunk {c.index} of {c.blob_id!r} would exceed "
                f"{self.max_buffered_bytes} bytes",
                c.blob_id,
            )
        self._partials[c.blob_id] = p
        p.parts[c.index] = c.data
        p.received += len(c.data)
        p.touched = self._clock()
        self._buffered += len(c.data)
        if len(p.parts) < c.count:
            return None
        return self._complete(p)

    def _partial_for(self, c: Chunk) -> _Partial:
        """The blob ``c`` belongs to: the one being collected, which ``c`` must agree with,
        or a new one (not yet kept: ``_add`` keeps it once ``c`` is accepted) if room is
        left after expiring stale ones."""
        p = self._partials.get(c.blob_id)
        if p is None:
            if len(self._partials) >= self.max_partial_blobs:
                self._expire(self._clock())
            if len(self._partials) >= self.max_partial_blobs:
                raise ChunkError(
                    f"already {len(self._partials)} partial blobs; refusing {c.blob_id!r}",
                    c.blob_id,
                )
            return _Partial(c, {}, 0, self._clock())
        if (c.count, c.size, c.sha256) != (p.first.count, p.first.size, p.first.sha256):
            raise ChunkError(
                f"chunk {c.index} of blob {c.blob_id!r} disagrees with its first "
                "chunk on count, size or sha256",
                c.blob_id,
            )
        return p

    def _complete(self, p: _Partial) -> bytes:
        first = p.first
        self._drop(first.blob_id)
        if p.received != first.size:
            raise ChunkError(
                f"blob {first.blob_id!r} has {p.received} bytes, not {first.size}", first.blob_id
            )
        blob = b"".join(p.parts.pop(i) for i in range(first.count))
        if hashlib.sha256(blob).hexdigest() != first.sha256:
            raise ChunkError(f"blob {first.blob_id!r} fails its SHA-256 check", first.blob_id)
        self._completed[first.blob_id] = (first.count, first.size, first.sha256)
        while len(self._completed) > self._remember:
            self._completed.popitem(last=False)
        return blob

    def _drop(self, blob_id: str) -> None:
        p = self._partials.pop(blob_id, None)
        if p is not None:
            self._buffered -= p.received

    def discard(self, blob_id: str) -> None:
        """Forget a partial blob, e.g. after one of its chunks was refused."""
        with self._lock:
            self._drop(blob_id)

    def expire(self, now: float | None = None) -> list[ChunkError]:
        """Drop every incomplete blob idle for ``timeout_s``; one error per blob dropped."""
        with self._lock:
            self._expire(self._clock() if now is None else now)
            expired, self._expired = self._expired, []
            return expired

    def _expire(self, now: float) -> None:
        for blob_id, p in list(self._partials.items()):
            if now - p.touched >= self.timeout_s:
                self._drop(blob_id)
                self._expired.append(
                    ChunkError(
                        f"blob {blob_id!r} incomplete after {now - p.touched:.1f} s idle: "
                        f"{len(p.parts)} of {p.first.count} chunks received",
                        blob_id,
                    )
                )
