"""The state of one federation (run): plain, immutable data that maps onto rows.

Times are POSIX seconds (floats) handed in by the caller; nothing here reads a clock.
Collections are sorted tuples (or a dict keyed by client id) so that equal states compare
equal and save to the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from orchestrator.state.policy import AVAILABILITY_PRIOR, RoundPolicy
from protocol.messages import ClientState, RoundState

# Clients a new round may select: ready ones, and those whose part in the last round is over.
SELECTABLE = frozenset({ClientState.READY, ClientState.FINISH})
IN_FLIGHT = frozenset({RoundState.OPEN, RoundState.AGGREGATING, RoundState.EVALUATING})


class Update(NamedTuple):
    """A stored client update: ``ref`` is opaque here (the service uses the blob's sha256)."""

    client_id: str
    ref: str
    num_samples: int


@dataclass(frozen=True, slots=True)
class ClientRecord:
    client_id: str
    state: ClientState
    joined_at: float
    last_seen: float
    # The first round number this client may be selected for: a client that joins while a
    # round is in flight waits for the next one.
    eligible_from: int
    # Why it is offline ("left", "kicked", "timeout"); None while it is not. Kicked is final.
    offline_reason: str | None = None
    # Observed availability in [0, 1], the weight of ``selection="availability"``
    # (policy.observe; updated by Tx.set_client). Kept across leaving and rejoining.
    availability: float = AVAILABILITY_PRIOR


@dataclass(frozen=True, slots=True)
class Round:
    """One round attempt. A retry replaces it with ``attempt + 1`` and the same ``number``."""

    number: int
    attempt: int
    state: RoundState
    selected: tuple[str, ...]
    quorum: int
    opened_at: float
    deadline: float
    base_model_version: int
    received: tuple[Update, ...] = ()
    dropped: tuple[str, ...] = ()
    aggregation_retries: int = 0
    model_version: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    # Set on a failed attempt that will be tried again as soon as it can open.
    retry_pending: bool = False
    failure: str | None = None

    # (selected, received client ids) as sets, made on first use: every update asks whether
    # its client is selected and whether anyone is left, and scanning the tuples made each
    # update cost O(fleet). Not a field of the state: not compared, copied or stored.
    _sets: tuple[frozenset[str], frozenset[str]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def _index(self) -> tuple[frozenset[str], frozenset[str]]:
        sets = self._sets
        if sets is None:
            sets = (frozenset(self.selected), frozenset(u.client_id for u in self.received))
            object.__setattr__(self, "_sets", sets)
        return sets

    @property
    def received_clients(self) -> frozenset[str]:
        return self._index()[1]

    def is_selected(self, client_id: str) -> bool:
        return client_id in self._index()[0]

    def with_update(self, update: Update) -> Round:
        """This round with ``update`` received (its index carried over, not rebuilt)."""
        new = replace(self, received=(*self.received, update))
        selected, received = self._index()
        object.__setattr__(new, "_sets", (selected, received | {update.client_id}))
        return new

    @property
    def expected(self) -> tuple[str, ...]:
        """Selected clients still to report: neither received from nor dropped."""
        done = self.received_clients | set(self.dropped)
        return tuple(c for c in self.selected if c not in done)

    @property
    def anyone_expected(self) -> bool:
        """Whether ``expected`` is not empty, without listing it."""
        selected, received = self._index()
        # Received clients are all selected (the machine refuses others); dropped ones are
        # few, and may have reported before they dropped.
        gone = {c for c in self.dropped if c in selected and c not in received}
        return len(selected) - len(received) - len(gone) > 0

    @property
    def in_flight(self) -> bool:
        return self.state in IN_FLIGHT

    @property
    def has_quorum(self) -> bool:
        return len(self.received) >= self.quorum


@dataclass(frozen=True, slots=True)
class Federation:
    """One run. ``round`` is the current or latest round attempt; history lives in the db."""

    run_id: str
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    clients: Mapping[str, ClientRecord] = field(default_factory=dict)
    round: Round | None = None
    # Rounds still to complete under autorun, the one in flight included; None: autorun off,
    # 0: it ran all its rounds.
    autorun_remaining: int | None = None
    paused: bool = False
    last_completed_round: int = 0
    model_version: int = 0

    @property
    def active_clients(self) -> int:
        """Clients not offline: the paper's "number of clients" (5 → 4 on a dropout)."""
        return sum(1 for c in self.clients.values() if c.state is not ClientState.OFFLINE)

    @property
    def retry_pending(self) -> bool:
        return self.round is not None and self.round.retry_pending

    def next_round_number(self) -> int:
        """The number the next round to open will have (a pending retry keeps its number).

        It is also a joining client's ``eligible_from``: while a round is in flight this is the
        round after it, so a late joiner waits, but a joiner may take part in a pending retry.
        """
        return next_round_number(self.round)


def next_round_number(current: Round | None) -> int:
    if current is None:
        return 1
    return current.number if current.retry_pending else current.number + 1
