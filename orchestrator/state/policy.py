"""How many clients a round takes, which ones, and how many updates it needs to close."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoundPolicy:
    """The rules of one run. Stored with the run, so a restarted orchestrator plays by them too.

    ``fraction`` of the eligible ready clients is selected (1.0: all of them), never fewer than
    ``min_clients``. A round needs ``quorum_count`` updates if set, else
    ``ceil(quorum_fraction * selected)``; a round attempt that ends below it fails and is tried
    again with a fresh selection until ``max_attempts`` attempts are spent. A retryable
    aggregation failure is dispatched again up to ``max_aggregation_retries`` times.
    """

    min_clients: int = 1
    fraction: float = 1.0
    quorum_fraction: float = 0.5
    quorum_count: int | None = None
    deadline_s: float = 300.0
    heartbeat_timeout_s: float = 60.0
    max_attempts: int = 3
    max_aggregation_retries: int = 2

    def __post_init__(self) -> None:
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
            )
            if bad
        ]
        if problems:
            raise ValueError("; ".join(problems))

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
        return min(eligible, max(share, self.min_clients - carried, 1))


def selection_key(run_id: str, number: int, attempt: int, client_id: str) -> bytes:
    """The rank of a client in one round attempt's draw.

    A hash instead of ``random``: its output is fixed by its inputs on every Python version and
    platform, so an orchestrator restarted mid-round recomputes exactly the same selection.
    """
    return hashlib.sha256(f"{run_id}\x00{number}\x00{attempt}\x00{client_id}".encode()).digest()


def select_clients(
    run_id: str,
    number: int,
    attempt: int,
    eligible: Iterable[str],
    carried: int,
    policy: RoundPolicy,
) -> tuple[str, ...]:
    """The fresh clients of one round attempt, sorted; deterministic in all its arguments."""
    pool = sorted(set(eligible))
    size = policy.sample_size(len(pool), carried)
    if size >= len(pool):
        return tuple(pool)
    ranked = sorted(pool, key=lambda c: (selection_key(run_id, number, attempt, c), c))
    return tuple(sorted(ranked[:size]))
