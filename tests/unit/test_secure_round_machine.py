"""SecAgg+ inside the round machine (orchestrator/state/secure.py): a secure round's stages
driven through ``step`` with real device sessions, the snapshot kept across every step,
and the round closing with exactly its survivors (or failing with the reason)."""

from __future__ import annotations

import hashlib

import numpy as np

from devices.secagg import SecAggDevice
from orchestrator.state import (
    ClientJoined,
    ClientLeft,
    ClientReady,
    CloseRound,
    DispatchAggregate,
    Effect,
    Federation,
    Input,
    OpenRound,
    Rejected,
    RoundFailed,
    RoundPolicy,
    SecAggMessage,
    SecAggSend,
    Tick,
    UpdateReceived,
    step,
)
from orchestrator.state import secagg as sm
from orchestrator.state.serde import join, split
from protocol.messages import SecAggInbox, SecAggRoster, SecAggUnmask
from protocol.secagg import SecAggConfig, dequantize_mean, layout_of
from protocol.secagg.ring import add
from workers.tasks.secagg import unmask_mean

BASE = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


class Secure:
    def __init__(self, n: int, stage_s: float = 10.0) -> None:
        cfg = sm.RunSecAgg(SecAggConfig(), stage_s).to_dict()
        self.fed = Federation("run", RoundPolicy(min_clients=n, quorum_fraction=0.5), secagg=cfg)
        self.now = 1000.0
        self.ids = [f"c{i}" for i in range(n)]
        rng = np.random.default_rng(0)
        self.true = {c: {k: rng.normal(0, 1, v.shape) for k, v in BASE.items()} for c in self.ids}
        self.devices = {
            c: SecAggDevice("run", c, 10 + i, self._train(c)) for i, c in enumerate(self.ids)
        }
        self.blobs: dict[str, bytes] = {}
        for c in self.ids:
            self(ClientJoined(c), ClientReady(c))

    def _train(self, cid: str):  # type: ignore[no-untyped-def]
        return lambda gw, rnd: ({k: v.astype(np.float32) for k, v in self.true[cid].items()}, {})

    def __call__(self, *events: Input) -> list[Effect]:
        out: list[Effect] = []
        for ev in events:
            self.fed, effects = step(self.fed, ev, self.now)
            head, parts = split(self.fed)
            assert join(head, parts.items()) == self.fed  # the snapshot keeps the stages
            out.extend(effects)
        return out

    def sends(self, effects: list[Effect], what: str) -> list[SecAggSend]:
        return [e for e in effects if isinstance(e, SecAggSend) and e.what == what]

    def keys(self, ids: list[str]) -> list[Effect]:
        out = []
        for c in ids:
            k = self.devices[c].on_round(1).keys
            ev = sm.KeysIn(c, sm.Keys(k.c_pub, k.s_pub, k.num_samples))
            out += self(SecAggMessage(c, 1, 1, ev))
        return out

    def shares(self, roster: SecAggSend, ids: list[str]) -> list[Effect]:
        msg = SecAggRoster.model_validate(
            {**roster.payload, "run_id": "run", "round": 1, "attempt": 1}
        )
        out = []
        for c in ids:
            boxes = self.devices[c].on_roster(msg).boxes
            out += self(SecAggMessage(c, 1, 1, sm.SharesIn(c, dict(boxes))))
        return out

    def masked(self, inboxes: list[SecAggSend], ids: list[str]) -> list[Effect]:
        out = []
        for e in inboxes:
            (c,) = e.to
            if c not in ids:
                continue
            inbox = SecAggInbox(run_id="run", client_id=c, round=1, boxes=dict(e.payload["boxes"]))
            meta, blob = self.devices[c].on_inbox(inbox, BASE, 0)
            sha = hashlib.sha256(blob).hexdigest()
            self.blobs[sha] = blob
            out += self(UpdateReceived(c, 1, sha, meta.num_samples))
        return out

    def reveal(self, request: SecAggSend, ids: list[str]) -> list[Effect]:
        msg = SecAggUnmask(run_id="run", round=1, **request.payload)
        out = []
        for c in ids:
            shares = self.devices[c].on_unmask(msg).shares
            ev = sm.RevealIn(c, {o: (s.kind, s.share) for o, s in shares.items()})
            out += self(SecAggMessage(c, 1, 1, ev))
        return out


def test_a_secure_round_closes_with_exactly_its_survivors_and_their_sum() -> None:
    sim = Secure(10)
    sim(OpenRound())
    assert sim.fed.round is not None and sim.fed.round.secagg is not None
    ids = sim.ids
    before, after = ids[0], ids[1:4]  # one leaves before sharing; three after masking
    (roster,) = sim.sends(sim.keys(ids[1:]) + sim(ClientLeft(before)), "roster")
    inboxes = sim.sends(sim.shares(roster, ids[1:]), "inbox")
    assert sorted(c for e in inboxes for c in e.to) == ids[1:]
    (request,) = sim.sends(sim.masked(inboxes, ids[1:]), "unmask")
    for c in after:
        sim(ClientLeft(c))  # gone after masking: never answers the unmask request
    assert sim(CloseRound())[0].__class__ is Rejected  # a secure round closes itself
    effects = sim.reveal(request, [c for c in ids[1:] if c not in after])
    (dispatch,) = [e for e in effects if isinstance(e, DispatchAggregate)]
    survivors = sorted(u.client_id for u in dispatch.updates)
    assert survivors == ids[1:]  # those that left after masking still count
    r = sim.fed.round.secagg
    assert r is not None and r.stage is sm.Stage.DONE and r.boxes == {}
    mean, samples = unmask_mean(sm.material(r), sim.blobs.__getitem__, layout_of(BASE))
    total = sim.devices[survivors[0]].last_quantized
    for c in survivors[1:]:
        total = add(total, sim.devices[c].last_quantized)
    assert samples == sum(sim.devices[c].num_samples for c in survivors)
    expected = dequantize_mean(total, samples, r.scale)
    assert np.array_equal(np.concatenate([mean[n].ravel() for n in sorted(mean)]), expected)


def test_an_update_in_a_secure_round_counts_only_as_a_masked_input() -> None:
    sim = Secure(5)
    sim(OpenRound())
    (refused,) = sim(UpdateReceived("c0", 1, "ab" * 32, 10))
    assert isinstance(refused, Rejected) and "expected in collect" in refused.reason
    assert sim.fed.round is not None and not sim.fed.round.received


def test_below_the_threshold_the_attempt_fails_with_the_reason() -> None:
    sim = Secure(5, stage_s=5)
    sim(OpenRound())
    (roster,) = sim.sends(sim.keys(sim.ids), "roster")
    sim.shares(roster, sim.ids[:1])
    sim.now += 6  # the share stage's deadline passes with one sharer
    failed = [e for e in sim(Tick()) if isinstance(e, RoundFailed)]
    assert failed and "fewer than the threshold" in failed[0].reason


def test_a_failed_secure_attempt_is_retried_with_everyone_and_carries_nothing() -> None:
    sim = Secure(5, stage_s=5)
    sim(OpenRound())
    (roster,) = sim.sends(sim.keys(sim.ids), "roster")
    inboxes = sim.sends(sim.shares(roster, sim.ids), "inbox")
    sim.masked(inboxes, sim.ids[:1])  # one masked input: below the threshold of 2
    sim.now += 6
    effects = sim(Tick())
    failed = [e for e in effects if isinstance(e, RoundFailed)]
    assert failed and not failed[0].final and "fewer than the threshold" in failed[0].reason
    rnd = sim.fed.round
    assert rnd is not None and rnd.attempt == 2 and rnd.secagg is not None
    assert rnd.selected == tuple(sim.ids) and not rnd.received  # c0 trains again
    assert rnd.secagg.attempt == 2 and rnd.secagg.stage is sm.Stage.ADVERTISE
