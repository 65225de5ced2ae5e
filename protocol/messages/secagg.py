"""SecAgg+ messages (protocol/secagg): the four stages of a secure round on the wire.

Device → orchestrator: ``SecAggKeys`` (stage 1), ``SecAggShares`` (stage 2, boxes the
orchestrator cannot open), ``SecAggReveal`` (stage 4). Orchestrator → device:
``SecAggRoster`` (everyone's keys and the round's public parameters), ``SecAggInbox`` (the
boxes addressed to one device), ``SecAggUnmask`` (who survived, who dropped). The masked
input itself (stage 3) is an ordinary ``UpdateMeta`` and blob. Sizes are bounded: a round
has at most ``MAX_PEERS`` devices on the roster and a device at most ``MAX_PEERS``
neighbours.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from protocol.messages.envelope import Envelope, Ident, Mac, PublicKeyHex, RoundNumber

MAX_PEERS = 4096
# 12-byte nonce + the JSON share pair (~330 bytes) + 16-byte tag, base64: well under 1 KiB.
ShareBox = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{40,1024}={0,2}$")]
ShareHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{132}$")]  # 66 bytes
SeedHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Attempt = Annotated[int, Field(ge=1, le=1000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PeerKeys(_Strict):
    c_pub: PublicKeyHex
    s_pub: PublicKeyHex
    num_samples: Annotated[int, Field(ge=1, le=10**9)]


class RevealedShare(_Strict):
    kind: Literal["b", "sk"]
    share: ShareHex


class SecAggKeys(Envelope):
    """Stage 1: a selected device's two fresh public keys, and its sample count (counts
    are public in SecAgg: they set the round's fixed-point scale)."""

    type: Literal["secagg_keys"] = "secagg_keys"
    client_id: Ident
    round: RoundNumber
    attempt: Attempt = 1
    keys: PeerKeys
    mac: Mac | None = None

    @model_validator(mode="after")
    def _distinct(self) -> SecAggKeys:
        if self.keys.c_pub == self.keys.s_pub:
            raise ValueError("the channel and mask keys must differ")
        return self


class SecAggRoster(Envelope):
    """Everyone who advertised keys, and what a device needs to share and mask."""

    type: Literal["secagg_roster"] = "secagg_roster"
    round: RoundNumber
    attempt: Attempt = 1
    keys: Annotated[dict[Ident, PeerKeys], Field(min_length=2, max_length=MAX_PEERS)]
    graph_seed: SeedHex
    degree: Annotated[int, Field(ge=1, le=MAX_PEERS)]
    threshold: Annotated[int, Field(ge=1, le=MAX_PEERS)]
    clip: Annotated[float, Field(gt=0, lt=1e6)]
    scale: Annotated[int, Field(ge=1, le=2**31)]

    @model_validator(mode="after")
    def _consistent(self) -> SecAggRoster:
        if self.threshold > self.degree or self.degree >= len(self.keys):
            raise ValueError("need threshold <= degree < devices on the roster")
        return self


class SecAggShares(Envelope):
    """Stage 2: encrypted share boxes for the device's neighbours, by recipient."""

    type: Literal["secagg_shares"] = "secagg_shares"
    client_id: Ident
    round: RoundNumber
    attempt: Attempt = 1
    boxes: Annotated[dict[Ident, ShareBox], Field(min_length=1, max_length=MAX_PEERS)]
    mac: Mac | None = None

    @model_validator(mode="after")
    def _not_to_self(self) -> SecAggShares:
        if self.client_id in self.boxes:
            raise ValueError("a device sends no share box to itself")
        return self


class SecAggInbox(Envelope):
    """The boxes neighbours addressed to ``client_id``, by sender."""

    type: Literal["secagg_inbox"] = "secagg_inbox"
    client_id: Ident
    round: RoundNumber
    attempt: Attempt = 1
    boxes: Annotated[dict[Ident, ShareBox], Field(max_length=MAX_PEERS)]


class SecAggUnmask(Envelope):
    """Stage 4's request: who sent masked input (survivors) and who shared keys but did
    not (dropped). A device reveals, per neighbour, the one share that fits, never both."""

    type: Literal["secagg_unmask"] = "secagg_unmask"
    round: RoundNumber
    attempt: Attempt = 1
    survivors: Annotated[list[Ident], Field(min_length=1, max_length=MAX_PEERS)]
    dropped: Annotated[list[Ident], Field(max_length=MAX_PEERS)]

    @model_validator(mode="after")
    def _disjoint(self) -> SecAggUnmask:
        if set(self.survivors) & set(self.dropped):
            raise ValueError("a device cannot be both a survivor and dropped")
        return self


class SecAggReveal(Envelope):
    """Stage 4's answer: shares by the peer they belong to."""

    type: Literal["secagg_reveal"] = "secagg_reveal"
    client_id: Ident
    round: RoundNumber
    attempt: Attempt = 1
    shares: Annotated[dict[Ident, RevealedShare], Field(max_length=MAX_PEERS)]
    mac: Mac | None = None


SECAGG_TYPES: tuple[type[Envelope], ...] = (
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggInbox,
    SecAggUnmask,
    SecAggReveal,
)
