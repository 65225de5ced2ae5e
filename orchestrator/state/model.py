"""The state of one federation (run): plain, immutable data that maps onto rows.

Times are POSIX seconds (floats) handed in by the caller; nothing here reads a clock.
Collections are sorted tuples (or a dict keyed by client id) so that equal states compare
equal and save to the same rows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any, NamedTuple, cast, overload

from orchestrator.state.policy import AVAILABILITY_PRIOR, RoundPolicy
from orchestrator.state.secagg import SecAggRound
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


class _Log:
    """The storage several ``Received`` versions share: updates in order, and each client's
    position."""

    __slots__ = ("index", "items", "lock")

    def __init__(self, items: Sequence[Update]) -> None:
        self.items: list[Update] = list(items)
        self.index: dict[str, int] = {}
        for i, u in enumerate(self.items):
            self.index.setdefault(u.client_id, i)
        self.lock = threading.Lock()


class Received(Sequence[Update]):
    """A round's received updates: an immutable sequence (equal to the tuple of its items)
    whose ``append`` is O(1) when it extends the newest version, as a round's history does.

    It was a tuple, copied whole with every update, and the received ids a frozenset copied
    likewise: O(received) per update, quadratic in a round (10,000 updates: 50 million
    copies). Versions share one append-only list; a version knows its length, so appending
    to an older one (a step whose result was thrown away) copies its prefix first.
    """

    __slots__ = ("_log", "_n")

    def __init__(self, items: Sequence[Update] = (), *, _log: _Log | None = None) -> None:
        self._log = _Log(items) if _log is None else _log
        self._n = len(items) if _log is None else len(_log.items)

    def append(self, update: Update) -> Received:
        log = self._log
        with log.lock:
            if len(log.items) != self._n:
                log = _Log(log.items[: self._n])
            log.index.setdefault(update.client_id, len(log.items))
            log.items.append(update)
            new = Received(_log=log)
            new._n = self._n + 1
            return new

    def has_client(self, client_id: str) -> bool:
        return self._log.index.get(client_id, self._n) < self._n

    def shares_log(self, other: Sequence[Update]) -> bool:
        """Whether ``other`` is a version of the same history (then the shorter one is a
        prefix of the longer)."""
        return isinstance(other, Received) and other._log is self._log

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Update: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[Update, ...]: ...

    def __getitem__(self, i: int | slice) -> Update | tuple[Update, ...]:
        if isinstance(i, slice):
            return tuple(self._log.items[: self._n][i])
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._log.items[i]

    def __iter__(self) -> Iterator[Update]:
        return islice(self._log.items, self._n)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Received) and other._log is self._log:
            return other._n == self._n
        if isinstance(other, Received | tuple | list):
            return len(other) == self._n and all(a == b for a, b in zip(self, other, strict=False))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


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
    received: Sequence[Update] = ()
    dropped: tuple[str, ...] = ()
    aggregation_retries: int = 0
    model_version: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    # Set on a failed attempt that will be tried again as soon as it can open.
    retry_pending: bool = False
    failure: str | None = None
    # A secure round's SecAgg+ stages (``orchestrator.state.secure``); None in a plain run.
    secagg: SecAggRound | None = None

    # The selected client ids as a set, made on first use: every update asks whether its
    # client is selected, and scanning the tuple made each update cost O(fleet). Not a field
    # of the state: not compared, copied or stored. Received ids: ``Received.has_client``.
    _selected: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every round holds a ``Received``, made once from a tuple (a loaded snapshot, a
        # test), so that membership and appends never rebuild it.
        if not isinstance(self.received, Received):
            object.__setattr__(self, "received", Received(self.received))

    @property
    def _received(self) -> Received:
        return cast(Received, self.received)

    def _selected_set(self) -> frozenset[str]:
        sel = self._selected
        if sel is None:
            sel = frozenset(self.selected)
            object.__setattr__(self, "_selected", sel)
        return sel

    @property
    def received_clients(self) -> frozenset[str]:
        return frozenset(u.client_id for u in self.received)

    def has_received(self, client_id: str) -> bool:
        return self._received.has_client(client_id)

    def is_selected(self, client_id: str) -> bool:
        return client_id in self._selected_set()

    def with_update(self, update: Update) -> Round:
        """This round with ``update`` received (O(1): see ``Received``; the selected set is
        carried over, not rebuilt)."""
        new = replace(self, received=self._received.append(update))
        object.__setattr__(new, "_selected", self._selected_set())
        return new

    @property
    def expected(self) -> tuple[str, ...]:
        """Selected clients still to report: neither received from nor dropped."""
        done = self.received_clients | set(self.dropped)
        return tuple(c for c in self.selected if c not in done)

    @property
    def anyone_expected(self) -> bool:
        """Whether ``expected`` is not empty, without listing it."""
        selected = self._selected_set()
        received = self._received
        # Received clients are all selected (the machine refuses others); dropped ones are
        # few, and may have reported before they dropped.
        gone = {c for c in self.dropped if c in selected and not received.has_client(c)}
        return len(selected) - len(received) - len(gone) > 0

    @property
    def in_flight(self) -> bool:
        return self.state in IN_FLIGHT

    @property
    def has_quorum(self) -> bool:
        return len(self.received) >= self.quorum


class Ticket(NamedTuple):
    """A slot of an async run: ``client_id`` was handed version ``base_version`` at
    ``handed_at`` and trains on it; its update names ``ticket`` as its round."""

    client_id: str
    ticket: int
    base_version: int
    handed_at: float


class Buffered(NamedTuple):
    """An accepted update of an async run waiting for its version step."""

    client_id: str
    ref: str
    num_samples: int
    ticket: int
    base_version: int


@dataclass(frozen=True, slots=True)
class Buffer:
    """The async side of a run (``policy.mode == "async"``; empty otherwise).

    ``training``: the slots in use, sorted by client id; ``updates``: accepted updates in
    arrival order, not yet folded; ``next_ticket``: the next slot's number (tickets never
    repeat, so (ticket, client) names one training); ``expired``: the latest slots given up
    (staleness or deadline) with why, newest last, so that their late update is refused
    with the reason; at most ``EXPIRED_KEPT``.
    """

    training: tuple[Ticket, ...] = ()
    updates: tuple[Buffered, ...] = ()
    next_ticket: int = 1
    expired: tuple[tuple[str, int, str], ...] = ()

    def ticket_of(self, client_id: str) -> Ticket | None:
        for t in self.training:
            if t.client_id == client_id:
                return t
        return None

    def buffered_clients(self) -> frozenset[str]:
        return frozenset(u.client_id for u in self.updates)


EXPIRED_KEPT = 256


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
    # Why the run may open no more rounds (its privacy budget is spent); None: it may.
    stopped: str | None = None
    last_completed_round: int = 0
    model_version: int = 0
    # SplitFed (docs/architecture.md, "Split learning"): every round attempt opens with an
    # edge session for its devices (``DispatchEdgeSession``). Set when the run is created.
    split: bool = False
    buffer: Buffer = field(default_factory=Buffer)
    # SecAgg+ (docs/architecture.md, "SecAgg+ wired into the round"): the run's ``secagg``
    # block (``secagg.RunSecAgg.to_dict``); every round attempt then runs the SecAgg+
    # stages and closes only once the survivors' sum can be unmasked. Set at creation.
    secagg: Mapping[str, Any] | None = None

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
