"""A working copy of a federation that one ``step`` edits, and the effects it collects.

``step`` never touches its input: the copy is built from it, edited, and turned into a new
``Federation`` at the end, or thrown away when the event is refused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from orchestrator.state.clientmap import Draft
from orchestrator.state.effects import ClientStateChanged, ClientWentOffline, Effect
from orchestrator.state.model import Buffer, ClientRecord, Federation, Round
from orchestrator.state.policy import RoundPolicy, observe
from protocol.messages import ClientState, RoundState


class Refused(Exception):
    """Raised by a handler to leave the state as it was: rejected, or ignored if ``ignored``.
    ``rejoin``: the client was written off (not kicked) and may come back by joining again."""

    def __init__(self, reason: str, *, ignored: bool = False, rejoin: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ignored = ignored
        self.rejoin = rejoin


class Tx:
    def __init__(self, fed: Federation, now: float) -> None:
        self.base = fed
        self.now = now
        # Copy-on-write: only the records this step changes are new (not the fleet).
        self.clients = Draft(fed.clients)
        self.round: Round | None = fed.round
        self.autorun_remaining = fed.autorun_remaining
        self.paused = fed.paused
        self.stopped = fed.stopped
        self.last_completed_round = fed.last_completed_round
        self.model_version = fed.model_version
        self.buffer: Buffer = fed.buffer
        self.effects: list[Effect] = []

    @property
    def policy(self) -> RoundPolicy:
        return self.base.policy

    def result(self) -> Federation:
        return replace(
            self.base,
            clients=self.clients.result(),
            round=self.round,
            autorun_remaining=self.autorun_remaining,
            paused=self.paused,
            stopped=self.stopped,
            last_completed_round=self.last_completed_round,
            model_version=self.model_version,
            buffer=self.buffer,
        )

    def emit(self, *effects: Effect) -> None:
        self.effects.extend(effects)

    # --- clients ----------------------------------------------------------------------------

    def client(self, client_id: str) -> ClientRecord:
        record = self.clients.get(client_id)
        if record is None:
            raise Refused(f"unknown client {client_id}")
        return record

    def live_client(self, client_id: str) -> ClientRecord:
        record = self.client(client_id)
        if record.state is ClientState.OFFLINE:
            raise Refused(
                f"{client_id} is offline ({record.offline_reason}); join again first",
                rejoin=record.offline_reason != "kicked",
            )
        return record

    def set_client(self, client_id: str, **changes: Any) -> None:
        old = self.clients[client_id]
        new = replace(old, **changes)
        if new.state is not old.state:
            present = _was_there(old.state, new.state, new.offline_reason)
            if present is not None:
                new = replace(new, availability=observe(old.availability, present))
        self.clients[client_id] = new

    def touch(self, client_id: str) -> None:
        self.set_client(client_id, last_seen=self.now)

    def move(self, client_id: str, state: ClientState, reason: str, **changes: Any) -> None:
        old = self.clients[client_id].state
        self.set_client(client_id, state=state, **changes)
        if old is not state:
            self.emit(ClientStateChanged(client_id, old, state, reason))

    def go_offline(self, client_id: str, reason: str) -> None:
        """Offline, and out of the open round's expected set; a received update stays counted."""
        old = self.clients[client_id].state
        self.set_client(client_id, state=ClientState.OFFLINE, offline_reason=reason)
        self.emit(ClientWentOffline(client_id, old, reason))
        rnd = self.round
        if (
            rnd is not None
            and rnd.state is RoundState.OPEN
            and rnd.is_selected(client_id)
            and client_id not in rnd.dropped
        ):
            self.set_round(dropped=tuple(sorted((*rnd.dropped, client_id))))

    # --- round ------------------------------------------------------------------------------

    def set_round(self, **changes: Any) -> None:
        assert self.round is not None
        self.round = replace(self.round, **changes)


def _was_there(old: ClientState, new: ClientState, offline_reason: str | None) -> bool | None:
    """What a client's move says about its availability (None: nothing).

    A selected client (training) that reports its update was there; one that leaves training
    any other way (its attempt closed or failed without its update, it dropped out, left or
    timed out) was not. A client that leaves or times out while not selected was not there
    to be asked either. A kick is the operator's doing and says nothing. Every such move
    rewrites the client's record anyway, so keeping availability costs no extra write.
    """
    if old is ClientState.TRAINING:
        if new is ClientState.UPDATE:
            return True
        return None if offline_reason == "kicked" else False
    if new is ClientState.OFFLINE and offline_reason in ("left", "timeout"):
        return False
    return None
