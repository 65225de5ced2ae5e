"""How many clients a round takes, which ones, and how many updates it needs to close."""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

Selection = Literal["uniform", "availability"]
SELECTIONS: tuple[Selection, ...] = ("uniform", "availability")
Mode = Literal["sync", "async"]
MODES: tuple[Mode, ...] = ("sync", "async")

# A client's availability (``ClientRecord.availability``): an exponentially decayed mean of
# what the machine observed whenever it needed the client, 1 for "it was there", 0 for "it
# was not" (``observe``; which transitions count is ``Tx.set_client``'s rule). A newcomer
# starts at the prior, 1: it has not failed yet, and a lower start would keep new devices
# out of rounds where they could prove themselves.
AVAILABILITY_PRIOR = 1.0
# Weight of the newest observation: after 3 misses in a row a perfect client is at 0.51,
# after 10 at 0.11, so the last ten or so selections decide.
AVAILABILITY_DECAY = 0.2
# The smallest weight a client is drawn with: an availability of ~0 would otherwise never be
# selected again, and only a selection can raise it.
AVAILABILITY_FLOOR = 0.05


def observe(availability: float, present: bool) -> float:
    """``availability`` after one more observation."""
    return (1.0 - AVAILABILITY_DECAY) * availability + (AVAILABILITY_DECAY if present else 0.0)


@dataclass(frozen=True, slots=True)
class RoundPolicy:
    """The rules of one run. Stored with the run, so a restarted orchestrator plays by them too.

    ``fraction`` of the eligible ready clients is selected (1.0: all of them), never fewer than
    ``min_clients`` and, if set, never more than ``max_clients`` in all (clients carried over
    by a retry included). ``selection`` says how: ``uniform`` draws every eligible client with
    the same chance, ``availability`` weights each by its observed availability. A round
    needs ``quorum_count`` updates if set, else ``ceil(quorum_fraction * selected)``; a round
    attempt that ends below it fails and is tried again with a fresh selection until
    ``max_attempts`` attempts are spent. A retryable aggregation failure is dispatched again
    up to ``max_aggregation_retries`` times.
    """

    min_clients: int = 1
    fraction: float = 1.0
    quorum_fraction: float = 0.5
    quorum_count: int | None = None
    deadline_s: float = 300.0
    heartbeat_timeout_s: float = 60.0
    max_attempts: int = 3
    max_aggregation_retries: int = 2
    max_clients: int | None = None
    selection: Selection = "uniform"
    # ``async``: buffered asynchronous aggregation (``orchestrator.state.buffered``): at most
    # ``concurrency`` clients train at once (None: all), each on the newest version when it
    # is handed a slot; every ``buffer_size`` accepted updates make a version step; an
    # update more than ``max_staleness`` versions behind is refused. ``deadline_s`` is how
    # long a slot waits for its update. Unused in ``sync`` mode.
    mode: Mode = "sync"
    buffer_size: int = 10
    max_staleness: int = 10
    concurrency: int | None = None

    def __post_init__(self) -> None:
        cap = self.max_clients
        problems = [
            msg
            for bad, msg in (
                (self.min_clients < 1, "min_clients must be >= 1"),
                (not 0.0 < self.fraction <= 1.0, "fraction must be in (0, 1]"),
                (not 0.0 < self.quorum_fraction <= 1.0, "quorum_fraction must be in (0, 1]"),
                (
                    self.quorum_count is not None and self.quorum_count < 1,
                    "quorum_count must be >= 1",
                ),
                (not self.deadline_s > 0, "deadline_s must be > 0"),
                (not self.heartbeat_timeout_s > 0, "heartbeat_timeout_s must be > 0"),
                (self.max_attempts < 1, "max_attempts must be >= 1"),
                (self.max_aggregation_retries < 0, "max_aggregation_retries must be >= 0"),
                (
                    cap is not None and (not isinstance(cap, int) or isinstance(cap, bool)),
                    f"max_clients must be a whole number or null, not {cap!r}",
                ),
                (
                    isinstance(cap, int) and cap < self.min_clients,
                    f"max_clients ({cap}) must be >= min_clients ({self.min_clients})",
                ),
                (self.mode not in MODES, f"mode must be one of {', '.join(MODES)}"),
                (self.buffer_size < 1, "buffer_size must be >= 1"),
                (self.max_staleness < 0, "max_staleness must be >= 0"),
                (
                    self.concurrency is not None and self.concurrency < 1,
                    "concurrency must be >= 1 or null",
                ),
                (
                    self.selection not in SELECTIONS,
                    f"selection must be one of {', '.join(SELECTIONS)}, not {self.selection!r}",
                ),
            )
            if bad
        ]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundPolicy:
        """A policy from JSON-like ``data`` (``--policy``), naming any field it does not know
        instead of Python's "unexpected keyword argument"."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a policy is an object of fields, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(
                f"unknown policy field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def quorum_for(self, selected: int) -> int:
        """Updates needed to close a round of ``selected`` clients (at least 1, at most all)."""
        if self.quorum_count is not None:
            need = self.quorum_count
        else:
            # round() first: 0.6 * 5 is 3.0000000000000004 in floats, and must not need 4.
            need = math.ceil(round(self.quorum_fraction * selected, 9))
        return max(1, min(need, selected))

    def sample_size(self, eligible: int, carried: int) -> int:
        """How many of ``eligible`` fresh clients to select when ``carried`` already reported."""
        if eligible == 0:
            return 0
        share = math.ceil(round(self.fraction * eligible, 9))
        want = max(share, self.min_clients - carried, 1)
        if self.max_clients is not None:
            # Carried clients count against the cap; a retry still takes one fresh client
            # (carried < quorum <= cap under one policy, so this only guards odd input).
            want = min(want, max(self.max_clients - carried, 1))
        return min(eligible, want)


def selection_key(run_id: str, number: int, attempt: int, client_id: str) -> bytes:
    """The rank of a client in one round attempt's draw.

    A hash instead of ``random``: its output is fixed by its inputs on every Python version and
    platform, so an orchestrator restarted mid-round recomputes exactly the same selection.
    """
    return hashlib.sha256(f"{run_id}\x00{number}\x00{attempt}\x00{client_id}".encode()).digest()


def selection_unit(run_id: str, number: int, attempt: int, client_id: str) -> float:
    """``selection_key`` as a uniform number in (0, 1): its first 53 bits, centred in their
    interval so that neither 0 nor 1 comes out (the weighted draw takes a logarithm)."""
    bits = int.from_bytes(selection_key(run_id, number, attempt, client_id)[:8], "big") >> 11
    return (bits + 0.5) / 2.0**53


def select_clients(
    run_id: str,
    number: int,
    attempt: int,
    eligible: Iterable[str],
    carried: int,
    policy: RoundPolicy,
    availability: Mapping[str, float] | None = None,
) -> tuple[str, ...]:
    """The fresh clients of one round attempt, sorted; deterministic in all its arguments.

    ``uniform``: the clients with the smallest ``selection_key`` (a uniform sample without
    replacement). ``availability``: weighted sampling without replacement (Efraimidis and
    Spirakis): each client's key is ``-ln(u) / w`` with ``u = selection_unit(...)`` and ``w``
    its availability (a missing one counts as the prior, at least ``AVAILABILITY_FLOOR``),
    and the smallest keys win: an exponential race in which a client twice as available
    runs twice as fast. The same arguments give the same draw (a machine whose ``log``
    rounds differently could differ only on a near-tie, and a drawn selection is stored with
    its round, never drawn again).

    One pass over the pool plus a heap of ``size``: O(eligible * log size), run once per
    round attempt, never per update.
    """
    pool = set(eligible)
    size = policy.sample_size(len(pool), carried)
    if size >= len(pool):
        return tuple(sorted(pool))
    if policy.selection == "availability":
        weights = availability or {}
        log, unit = math.log, selection_unit

        def weighted(c: str) -> tuple[float, str]:
            w = max(weights.get(c, AVAILABILITY_PRIOR), AVAILABILITY_FLOOR)
            return (-log(unit(run_id, number, attempt, c)) / w, c)

        chosen = heapq.nsmallest(size, pool, key=weighted)
    else:
        # The client id breaks ties, so the draw does not depend on the pool's order.
        chosen = heapq.nsmallest(
            size, pool, key=lambda c: (selection_key(run_id, number, attempt, c), c)
        )
    return tuple(sorted(chosen))
