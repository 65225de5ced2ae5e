"""The cyclic garbage collector's settings for a long-running service process.

An orchestrator under load allocates many short-lived containers a message (rows, dicts,
pydantic models), so young collections run every few updates and, every tenth of those, an
older one walks what survived: the imported modules, SQLAlchemy's metadata and compiled
statements, everything startup built, which lives as long as the process anyway. Frozen
(``gc.freeze``), it is never walked again: 15 to 20 % of the CPU an update took
(benchmarks/update_cpu.py). The thresholds stay CPython's: raising them saved nothing more
that the benchmark could tell apart from noise, and would keep cyclic garbage (a 1 MB
update's body among it) alive longer.
"""

from __future__ import annotations

import gc


def tune_for_service() -> None:
    """Collect, then freeze what exists now; call once a service has started up (its
    imports done, its engine and bus made), before it takes work."""
    gc.collect()
    gc.freeze()
