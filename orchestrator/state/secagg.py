"""SecAgg+ round sub-states: a pure machine beside the round machine, inputs → effects.

A secure round's life inside the ordinary round (``rounds``): the round opens and its
devices are announced as usual; then

1. ``advertise``: each selected device sends its two public keys and sample count. When
   every selected device that is still online has (or the stage deadline passed with
   enough), the roster goes to all advertisers (``SendRoster``) with the graph degree,
   the threshold and the fixed-point scale for their summed counts.
2. ``share``: each advertiser sends one encrypted box per graph neighbour. When all have
   (or the deadline), each sharer is sent the boxes addressed to it (``SendInbox``).
   Sharers are the devices whose pairwise masks may be in the sum.
3. ``collect``: sharers train, mask, and send the masked vector as an ordinary update
   (``MaskedInput``). Stage closes when every sharer still online has, or at the deadline.
4. ``unmask``: survivors (sharers whose masked input arrived) are told who survived and
   who dropped (``RequestUnmask``); each reveals, per neighbour, one share. Once every
   survivor answered (or the deadline), the machine checks that every needed secret has
   ``threshold`` shares and hands over (``Unmasked``: the material the aggregate task
   needs) or fails the round with the reason (``SecAggFailed``).

Any input out of its stage, from a device not entitled to it, or inconsistent with the
graph is refused with a reason (``SecAggRefused``) and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from protocol.secagg import SecAggConfig, SecAggError, choose_scale, neighbours


class Stage(StrEnum):
    ADVERTISE = "advertise"
    SHARE = "share"
    COLLECT = "collect"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Keys:
    c_pub: str
    s_pub: str
    num_samples: int


@dataclass(frozen=True)
class SecAggRound:
    run_id: str
    round: int
    attempt: int
    selected: tuple[str, ...]
    config: SecAggConfig
    graph_seed: str  # hex, drawn when the round opened: before any key is known
    stage_s: float  # each stage's time limit
    stage: Stage = Stage.ADVERTISE
    deadline: float = 0.0
    offline: frozenset[str] = frozenset()
    keys: Mapping[str, Keys] = field(default_factory=dict)
    degree: int = 0
    threshold: int = 0
    scale: int = 0
    boxes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # sender -> to -> box
    sharers: tuple[str, ...] = ()
    masked: Mapping[str, str] = field(default_factory=dict)  # client -> update ref
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    revealed: Mapping[str, Mapping[str, tuple[str, str]]] = field(default_factory=dict)
    failure: str | None = None

    @property
    def graph(self) -> dict[str, list[str]]:
        return neighbours(self.keys, bytes.fromhex(self.graph_seed), self.degree)

    @property
    def context(self) -> bytes:
        return context_of(self.run_id, self.round, self.attempt)


def context_of(run_id: str, round_number: int, attempt: int) -> bytes:
    """What binds the round's keys, seeds and boxes (devices derive it alike)."""
    return f"fedmq-secagg\n{run_id}\n{round_number}\n{attempt}".encode()


# --- inputs and effects ----------------------------------------------------------------------


@dataclass(frozen=True)
class KeysIn:
    client_id: str
    keys: Keys


@dataclass(frozen=True)
class SharesIn:
    client_id: str
    boxes: Mapping[str, str]


@dataclass(frozen=True)
class MaskedInput:
    client_id: str
    ref: str
    num_samples: int


@dataclass(frozen=True)
class RevealIn:
    client_id: str
    shares: Mapping[str, tuple[str, str]]  # owner -> (kind, share hex)


@dataclass(frozen=True)
class DeviceLost:
    client_id: str


@dataclass(frozen=True)
class Tick:
    pass


SecAggInput = KeysIn | SharesIn | MaskedInput | RevealIn | DeviceLost | Tick


@dataclass(frozen=True)
class SendRoster:
    to: tuple[str, ...]
    keys: Mapping[str, Keys]
    graph_seed: str
    degree: int
    threshold: int
    clip: float
    scale: int

    def fields(self) -> dict[str, Any]:
        """The roster message's fields (less run and round): every key, in client order,
        and the round's graph and quantisation parameters."""
        keys = {
            c: {"c_pub": k.c_pub, "s_pub": k.s_pub, "num_samples": k.num_samples}
            for c, k in sorted(self.keys.items())
        }
        return {
            "keys": keys,
            "graph_seed": self.graph_seed,
            "degree": self.degree,
            "threshold": self.threshold,
            "clip": self.clip,
            "scale": self.scale,
        }


@dataclass(frozen=True)
class SendInbox:
    to: str
    boxes: Mapping[str, str]


@dataclass(frozen=True)
class RequestUnmask:
    to: tuple[str, ...]
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class Unmasked:
    """Everything the aggregate task needs, none of it secret on its own."""

    material: dict[str, Any]


@dataclass(frozen=True)
class SecAggFailed:
    reason: str


@dataclass(frozen=True)
class SecAggRefused:
    input: SecAggInput
    reason: str


SecAggEffect = SendRoster | SendInbox | RequestUnmask | Unmasked | SecAggFailed | SecAggRefused


class _Refuse(Exception):
    pass


def start(
    run_id: str,
    round_number: int,
    attempt: int,
    selected: tuple[str, ...],
    config: SecAggConfig,
    graph_seed: str,
    *,
    now: float,
    stage_s: float,
) -> SecAggRound:
    return SecAggRound(
        run_id,
        round_number,
        attempt,
        tuple(sorted(selected)),
        config,
        graph_seed,
        stage_s,
        deadline=now + stage_s,
    )


def step(r: SecAggRound, ev: SecAggInput, now: float) -> tuple[SecAggRound, list[SecAggEffect]]:
    """Apply one input; a refused input returns ``r`` unchanged and one ``SecAggRefused``."""
    effects: list[SecAggEffect] = []
    try:
        r = _apply(r, ev)
    except _Refuse as refused:
        return r, [SecAggRefused(ev, str(refused))]
    r = _advance(r, now, effects)
    return r, effects


def _apply(r: SecAggRound, ev: SecAggInput) -> SecAggRound:
    if isinstance(ev, Tick):
        return r
    if r.stage in (Stage.DONE, Stage.FAILED):
        raise _Refuse(f"secure aggregation of round {r.round} is {r.stage}")
    if isinstance(ev, DeviceLost):
        return replace(r, offline=r.offline | {ev.client_id})
    if ev.client_id in r.offline:
        raise _Refuse(f"{ev.client_id} went offline during round {r.round}")
    if isinstance(ev, KeysIn):
        return _on_keys(r, ev)
    if isinstance(ev, SharesIn):
        return _on_shares(r, ev)
    if isinstance(ev, MaskedInput):
        return _on_masked(r, ev)
    return _on_reveal(r, ev)


def _expect(r: SecAggRound, stage: Stage, what: str) -> None:
    if r.stage is not stage:
        raise _Refuse(f"{what} arrived in stage {r.stage}, expected in {stage}")


def _on_keys(r: SecAggRound, ev: KeysIn) -> SecAggRound:
    _expect(r, Stage.ADVERTISE, "keys")
    if ev.client_id not in r.selected:
        raise _Refuse(f"{ev.client_id} is not selected for round {r.round}")
    if ev.client_id in r.keys:
        raise _Refuse(f"{ev.client_id} already advertised its keys")
    used = {k for keys in r.keys.values() for k in (keys.c_pub, keys.s_pub)}
    if ev.keys.c_pub in used or ev.keys.s_pub in used or ev.keys.c_pub == ev.keys.s_pub:
        raise _Refuse("a public key already on the roster")
    return replace(r, keys={**r.keys, ev.client_id: ev.keys})


def _on_shares(r: SecAggRound, ev: SharesIn) -> SecAggRound:
    _expect(r, Stage.SHARE, "shares")
    if ev.client_id not in r.keys:
        raise _Refuse(f"{ev.client_id} advertised no keys this round")
    if ev.client_id in r.boxes:
        raise _Refuse(f"{ev.client_id} already shared its keys")
    want = set(r.graph[ev.client_id])
    if set(ev.boxes) != want:
        raise _Refuse(f"{ev.client_id} must send one box to each neighbour {sorted(want)}")
    return replace(r, boxes={**r.boxes, ev.client_id: dict(ev.boxes)})


def _on_masked(r: SecAggRound, ev: MaskedInput) -> SecAggRound:
    _expect(r, Stage.COLLECT, "a masked input")
    if ev.client_id not in r.sharers:
        raise _Refuse(f"{ev.client_id} shared no keys: its input could never be unmasked")
    if ev.client_id in r.masked:
        raise _Refuse(f"duplicate masked input from {ev.client_id}; the first is kept")
    announced = r.keys[ev.client_id].num_samples
    if ev.num_samples != announced:
        raise _Refuse(f"{ev.num_samples} samples, but {announced} were announced with the keys")
    return replace(r, masked={**r.masked, ev.client_id: ev.ref})


def _on_reveal(r: SecAggRound, ev: RevealIn) -> SecAggRound:
    _expect(r, Stage.UNMASK, "shares to unmask")
    if ev.client_id not in r.survivors:
        raise _Refuse(f"{ev.client_id} is not a survivor of round {r.round}")
    if ev.client_id in r.revealed:
        raise _Refuse(f"{ev.client_id} already revealed its shares")
    near = set(r.graph[ev.client_id]) & set(r.sharers)
    alive, gone = set(r.survivors), set(r.dropped)
    for owner, (kind, _) in ev.shares.items():
        if owner not in near:
            raise _Refuse(f"{ev.client_id} holds no share of {owner}")
        want = "b" if owner in alive else "sk" if owner in gone else None
        if kind != want:
            raise _Refuse(f"{owner}'s {kind} share was not asked for")
    return replace(r, revealed={**r.revealed, ev.client_id: dict(ev.shares)})


# --- stage changes ---------------------------------------------------------------------------


def _advance(r: SecAggRound, now: float, out: list[SecAggEffect]) -> SecAggRound:
    while True:
        nxt = _next(r, now, out)
        if nxt is r:
            return r
        r = nxt


def _waiting(r: SecAggRound, expected: set[str], done: set[str]) -> bool:
    return bool(expected - done - r.offline)


def _next(r: SecAggRound, now: float, out: list[SecAggEffect]) -> SecAggRound:
    late = now >= r.deadline
    if r.stage is Stage.ADVERTISE:
        if not late and _waiting(r, set(r.selected), set(r.keys)):
            return r
        return _to_share(r, now, out)
    if r.stage is Stage.SHARE:
        if not late and _waiting(r, set(r.keys), set(r.boxes)):
            return r
        return _to_collect(r, now, out)
    if r.stage is Stage.COLLECT:
        if not late and _waiting(r, set(r.sharers), set(r.masked)):
            return r
        return _to_unmask(r, now, out)
    if r.stage is Stage.UNMASK:
        if not late and _waiting(r, set(r.survivors), set(r.revealed)):
            return r
        return _finish(r, out)
    return r


def _fail(r: SecAggRound, reason: str, out: list[SecAggEffect]) -> SecAggRound:
    out.append(SecAggFailed(reason))
    return replace(r, stage=Stage.FAILED, failure=reason)


def _to_share(r: SecAggRound, now: float, out: list[SecAggEffect]) -> SecAggRound:
    n = len(r.keys)
    if n < 3:
        return _fail(r, f"{n} devices advertised keys; secure aggregation needs 3", out)
    degree, threshold = r.config.degree_for(n), r.config.threshold_for(n)
    try:
        scale = choose_scale(r.config.clip, sum(k.num_samples for k in r.keys.values()))
    except SecAggError as e:
        return _fail(r, str(e), out)
    to = tuple(sorted(set(r.keys) - r.offline))
    r = replace(
        r,
        stage=Stage.SHARE,
        deadline=now + r.stage_s,
        degree=degree,
        threshold=threshold,
        scale=scale,
    )
    out.append(SendRoster(to, dict(r.keys), r.graph_seed, degree, threshold, r.config.clip, scale))
    return r


def _to_collect(r: SecAggRound, now: float, out: list[SecAggEffect]) -> SecAggRound:
    sharers = tuple(sorted(set(r.boxes) - r.offline))
    if len(sharers) < r.threshold:
        return _fail(
            r, f"{len(sharers)} devices shared keys, fewer than the threshold {r.threshold}", out
        )
    for cid in sharers:
        inbox = {s: r.boxes[s][cid] for s in sharers if s != cid and cid in r.boxes[s]}
        out.append(SendInbox(cid, inbox))
    # The boxes are in the inboxes now (the service's outbox keeps them until sent): the
    # snapshot, rewritten at every later step of the round, no longer carries them.
    return replace(r, stage=Stage.COLLECT, deadline=now + r.stage_s, sharers=sharers, boxes={})


def _to_unmask(r: SecAggRound, now: float, out: list[SecAggEffect]) -> SecAggRound:
    survivors = tuple(sorted(r.masked))
    if len(survivors) < r.threshold:
        return _fail(
            r, f"{len(survivors)} masked inputs, fewer than the threshold {r.threshold}", out
        )
    dropped = tuple(sorted(set(r.sharers) - set(survivors)))
    r = replace(
        r, stage=Stage.UNMASK, deadline=now + r.stage_s, survivors=survivors, dropped=dropped
    )
    out.append(RequestUnmask(tuple(c for c in survivors if c not in r.offline), survivors, dropped))
    return r


def _finish(r: SecAggRound, out: list[SecAggEffect]) -> SecAggRound:
    g = r.graph
    for owner, kind in [(c, "b") for c in r.survivors] + [(c, "sk") for c in r.dropped]:
        held = [rep for rep, shares in r.revealed.items() if owner in shares and rep in g[owner]]
        if len(held) < r.threshold:
            what = "self-mask" if kind == "b" else "key"
            return _fail(
                r,
                f"{len(held)} {what} shares of {owner} revealed, fewer than the "
                f"threshold {r.threshold}",
                out,
            )
    out.append(Unmasked(material(r)))
    return replace(r, stage=Stage.DONE)


def material(r: SecAggRound) -> dict[str, Any]:
    """The unmasking material as JSON: public keys, graph, sharers, survivors' refs, the
    revealed shares. None of it is an update; with it, only the sum can be recovered."""
    return {
        "context": r.context.decode(),
        "graph_seed": r.graph_seed,
        "degree": r.degree,
        "threshold": r.threshold,
        "scale": r.scale,
        "clip": r.config.clip,
        "keys": {c: [k.c_pub, k.s_pub, k.num_samples] for c, k in sorted(r.keys.items())},
        "sharers": list(r.sharers),
        "masked": dict(sorted(r.masked.items())),
        "revealed": {
            rep: {o: list(ks) for o, ks in sorted(sh.items())}
            for rep, sh in sorted(r.revealed.items())
        },
    }


# --- the run's settings and the snapshot --------------------------------------------------

# Each stage's time limit when the run's ``secagg`` block names none.
DEFAULT_STAGE_S = 60.0


@dataclass(frozen=True)
class RunSecAgg:
    """A run's ``secagg`` block: the protocol's settings and each stage's time limit."""

    config: SecAggConfig
    stage_s: float = DEFAULT_STAGE_S

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RunSecAgg:
        """Raises ``SecAggError`` naming what is wrong (unknown keys included)."""
        rest = dict(raw)
        stage_s = rest.pop("stage_s", DEFAULT_STAGE_S)
        if isinstance(stage_s, bool) or not isinstance(stage_s, int | float) or stage_s <= 0:
            raise SecAggError("secagg stage_s is a positive number of seconds")
        return cls(SecAggConfig.from_dict(rest), float(stage_s))

    def to_dict(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "stage_s": self.stage_s}


def round_to_dict(r: SecAggRound) -> dict[str, Any]:
    return {
        "run_id": r.run_id,
        "round": r.round,
        "attempt": r.attempt,
        "selected": list(r.selected),
        "config": r.config.to_dict(),
        "graph_seed": r.graph_seed,
        "stage_s": r.stage_s,
        "stage": r.stage.value,
        "deadline": r.deadline,
        "offline": sorted(r.offline),
        "keys": {c: [k.c_pub, k.s_pub, k.num_samples] for c, k in sorted(r.keys.items())},
        "degree": r.degree,
        "threshold": r.threshold,
        "scale": r.scale,
        "boxes": {s: dict(b) for s, b in sorted(r.boxes.items())},
        "sharers": list(r.sharers),
        "masked": dict(sorted(r.masked.items())),
        "survivors": list(r.survivors),
        "dropped": list(r.dropped),
        "revealed": {
            rep: {o: list(ks) for o, ks in sorted(sh.items())}
            for rep, sh in sorted(r.revealed.items())
        },
        "failure": r.failure,
    }


def round_from_dict(d: Mapping[str, Any]) -> SecAggRound:
    return SecAggRound(
        run_id=str(d["run_id"]),
        round=int(d["round"]),
        attempt=int(d["attempt"]),
        selected=tuple(d["selected"]),
        config=SecAggConfig.from_dict(d["config"]),
        graph_seed=str(d["graph_seed"]),
        stage_s=float(d["stage_s"]),
        stage=Stage(d["stage"]),
        deadline=float(d["deadline"]),
        offline=frozenset(d["offline"]),
        keys={c: Keys(str(k[0]), str(k[1]), int(k[2])) for c, k in d["keys"].items()},
        degree=int(d["degree"]),
        threshold=int(d["threshold"]),
        scale=int(d["scale"]),
        boxes={s: dict(b) for s, b in d["boxes"].items()},
        sharers=tuple(d["sharers"]),
        masked=dict(d["masked"]),
        survivors=tuple(d["survivors"]),
        dropped=tuple(d["dropped"]),
        revealed={
            rep: {o: (str(ks[0]), str(ks[1])) for o, ks in sh.items()}
            for rep, sh in d["revealed"].items()
        },
        failure=d.get("failure"),
    )
