"""The cyclic garbage collector's settings for a long-running service process.

An orchestrator under load allocates many short-lived containers a message (rows, dicts,
pydantic models); with CPython's default thresholds (a young collection every 700 net
allocations) a collection ran every few updates and each older one walked the whole heap
(the imported modules, SQLAlchemy's metadata, the run's snapshot): 15 to 20 % of the CPU an
update took (benchmarks/update_cpu.py). What the process built while starting is frozen
(never collected: it lives as long as the process), and young collections run less often.
Reference counting still frees everything without cycles at once; only cyclic garbage waits
a little longer.
"""

from __future__ import annotations

import gc

# Net container allocations between young collections, and how many young (then middle)
# collections make an older one. CPython's defaults: 700, 10, 10.
THRESHOLDS = (10_000, 20, 100)


def tune_for_service() -> None:
    """Freeze what exists now and collect less often; call once a service has started up
    (its imports done), before it takes work."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
