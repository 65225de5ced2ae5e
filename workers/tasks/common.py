"""What the tasks share: their errors, one engine per process, reading blobs."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db.engine import make_engine, make_sessionmaker, session_scope


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


def blob_loader(factory: sessionmaker[Session]) -> Callable[[str], bytes]:
    """A ``load(sha) -> bytes`` reading each blob in its own short transaction, so that a
    long fold never holds a transaction (or, on SQLite, the write lock) open."""

    def load(sha: str) -> bytes:
        with session_scope(factory) as s:
            return blobstore.get(s, sha)

    return load
