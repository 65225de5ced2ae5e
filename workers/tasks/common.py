"""What the tasks share: their errors, one engine per process, reading blobs."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db.blobstore import BlobError
from db.engine import make_engine, make_sessionmaker, session_scope

MiB = 1 << 20


class TaskError(Exception):
    """A task failed for a reason that retrying will not fix (bad config, no usable
    update, a stale attempt). Celery records it as the task's failure; the orchestrator
    reads the exception type and treats these as not retryable."""


class AggregationError(TaskError):
    pass


class EvaluationError(TaskError):
    pass


_lock = threading.Lock()
_factories: dict[tuple[int, str], sessionmaker[Session]] = {}


def sessions(database_url: str) -> sessionmaker[Session]:
    """The session factory for ``database_url`` in this process.

    Keyed by pid as well: a prefork child must not reuse connections its parent opened
    (two processes on one socket corrupt the protocol), so each process builds its own.
    """
    key = (os.getpid(), database_url)
    with _lock:
        factory = _factories.get(key)
        if factory is None:
            factory = make_sessionmaker(make_engine(database_url))
            _factories[key] = factory
        return factory


def dispose_all() -> None:
    """Close this process's pools (tests; a worker shutting down)."""
    with _lock:
        for (pid, _), factory in list(_factories.items()):
            if pid == os.getpid():
                bind = factory.kw.get("bind")
                if isinstance(bind, Engine):
                    bind.dispose()
        _factories.clear()


# A page of update blobs: at most this many, and at most this many stored bytes (always at
# least one blob). Bytes bound the memory whatever the model: 32 MiB is two ResNet-18 bf16
# updates, or hundreds of small ones, read in one short transaction.
PAGE_BLOBS = 64
PAGE_BYTES = 32 * MiB


def blob_loader(
    factory: sessionmaker[Session],
    order: Sequence[str] | None = None,
    *,
    page_blobs: int = PAGE_BLOBS,
    page_bytes: int = PAGE_BYTES,
) -> Callable[[str], bytes]:
    """A ``load(sha) -> bytes`` that never holds a transaction (or, on SQLite, the write
    lock) open across a long fold.

    Without ``order`` each blob is read in its own short transaction. With ``order`` (the
    shas in the order they will be asked for) blobs are read a page at a time
    (``PagedLoader``); a sha outside ``order`` is still read alone.
    """
    if order is None:
        return lambda sha: _load_one(factory, sha)
    return PagedLoader(factory, order, page_blobs=page_blobs, page_bytes=page_bytes)


def _load_one(factory: sessionmaker[Session], sha: str) -> bytes:
    with session_scope(factory) as s:
        return blobstore.get(s, sha)


class PagedLoader:
    """Reads blobs a page at a time in the order a fold asks for them.

    One short transaction per page, two statements (``blobstore.get_page``): reading 1,000
    small updates one by one spent three statements and a transaction on each. A page
    holds at most ``page_blobs`` blobs and ``page_bytes`` stored bytes (but always one),
    and each blob is dropped from it once it has been asked for as many times as the page
    covers it, so memory is bounded by bytes, not only by count: decode-ahead still runs
    two updates ahead whatever the page holds. A blob that cannot be read (missing,
    corrupt) raises its own BlobError when asked for, as ``blobstore.get`` would. The
    caller may skip shas of ``order`` (they are dropped with the page); asking out of
    order only costs extra reads. Safe to call from any one thread at a time (a lock).
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        order: Sequence[str],
        *,
        page_blobs: int = PAGE_BLOBS,
        page_bytes: int = PAGE_BYTES,
    ) -> None:
        if page_blobs < 1 or page_bytes < 0:
            raise ValueError("page_blobs must be >= 1 and page_bytes >= 0")
        self._factory = factory
        self._order = list(order)
        self._page_blobs = page_blobs
        self._page_bytes = page_bytes
        self._next = 0  # the first position of ``order`` not yet paged in
        self._page: dict[str, bytes | BlobError] = {}
        self._uses: dict[str, int] = {}  # asks left for each blob of the page
        self._lock = threading.Lock()
        self.pages = 0  # pages read (tests, benchmarks)

    def __call__(self, sha: str) -> bytes:
        with self._lock:
            if sha not in self._page and not self._fill(sha):
                return _load_one(self._factory, sha)
            value = self._page[sha]
            self._uses[sha] -= 1
            if self._uses[sha] <= 0:
                del self._page[sha], self._uses[sha]
        if isinstance(value, BlobError):
            raise value
        return value

    def _fill(self, sha: str) -> bool:
        """Read the page that starts at the next ask for ``sha``; False if none is due."""
        try:
            start = self._order.index(sha, self._next)
        except ValueError:
            return False
        # Left-overs were skipped by the caller (no use for their bytes now).
        self._page, self._uses = {}, {}
        window = self._order[start : start + self._page_blobs]
        with session_scope(self._factory) as s:
            page = blobstore.get_page(s, window, self._page_bytes)
        end = start
        for key in window:  # the page covers positions up to the first blob it left out
            if key not in page:
                break
            self._uses[key] = self._uses.get(key, 0) + 1
            end += 1
        self._page, self._next = page, end
        self.pages += 1
        return True
