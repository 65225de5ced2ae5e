"""Decode-ahead: run an iterator in a background thread, a bounded distance ahead of its
consumer.

The aggregate task's producer is ``workers.fold.iter_deltas`` (read a blob, zstd, widen
bf16, subtract, clip: all CPU work in numpy and zstandard, which release the GIL on large
buffers), its consumer the fold. With ``depth`` 2 the thread decodes at most two updates
ahead of the one being folded, so at most three are alive at once (memory O(model)), and
on two cores decoding update k+1 overlaps folding update k.

Contract: the producer's exceptions are raised in the consumer, with their traceback;
when the consumer stops early (``break``, an exception, ``close()``) the thread is told to
stop and joined before ``close()`` returns. The thread starts on the first ``next()``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator, Iterable
from typing import TypeVar, cast

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_DEPTH = 2
# How long closing waits for a producer stuck inside one item (a blob read that hangs);
# the thread is a daemon, so a process exit does not wait for it either way.
JOIN_TIMEOUT_S = 60.0


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def read_ahead(
    source: Iterable[T], depth: int = DEFAULT_DEPTH, *, name: str = "decode-ahead"
) -> Generator[T, None, None]:
    """Yield ``source``'s items, produced by a thread at most ``depth`` items ahead."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    # A permit per item produced (or being produced) and not yet taken by the consumer;
    # a plain Queue(maxsize) would let the producer hold one more in its hands.
    permits = threading.Semaphore(depth)
    items: queue.SimpleQueue[object] = queue.SimpleQueue()
    stop = threading.Event()

    def produce() -> None:
        it = iter(source)
        try:
            while True:
                permits.acquire()
                if stop.is_set():
                    return
                try:
                    item = next(it)
                except StopIteration:
                    items.put(_DONE)
                    return
                items.put(item)
                del item  # the queue (then the consumer) holds it, not this frame
        except BaseException as e:  # handed to the consumer, not swallowed
            items.put(_Failed(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a generator source runs its cleanup in the thread that ran it

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            got = items.get()
            if got is _DONE:
                return
            if isinstance(got, _Failed):
                raise got.error
            permits.release()  # the consumer holds this one now; the producer may go on
            yield cast(T, got)
            del got  # not held while waiting for the next one
    finally:
        stop.set()
        permits.release()  # wake a producer waiting for a permit so that it sees stop
        thread.join(JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.warning("%s thread still busy %.0f s after its consumer stopped", name,
                        JOIN_TIMEOUT_S)  # fmt: skip
