"""What the gateway reads from the database: who is calling, runs, rounds, global models.

The gateway never writes the database: everything it changes goes through the bus as the
message an AMQP device (or operator) would send, and the orchestrator decides. Reads here
only refuse early what the orchestrator would refuse anyway, so that an HTTP device gets
its reason in the answer instead of in the dead-letter queue.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.models import ParticipationState, RoundState
from db.queries.keys import KEY_NAME, get_public_key
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.schemas import RoundInfo
from protocol.codec import CodecError, TensorSpec, peek_header
from protocol.secagg.blob import masked_spec
from protocol.signing import encode_key

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A small thread-safe map whose entries expire ``ttl_s`` after they were put."""

    def __init__(self, ttl_s: float, size: int = 10_000) -> None:
        self.ttl_s, self.size = ttl_s, size
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or time.monotonic() - item[0] > self.ttl_s:
                return None
            return item[1]

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = (time.monotonic(), value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclass(frozen=True)
class ClientRef:
    id: str
    run_id: str
    state: str


@dataclass(frozen=True)
class Caller:
    token: str
    client: ClientRef | None  # None: the operator

    @property
    def operator(self) -> bool:
        return self.client is None


@dataclass(frozen=True)
class Model:
    run_id: str
    version: int
    sha256: str
    blob: bytes

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'  # content-addressed: the hash is the strongest validator


@dataclass(frozen=True)
class UploadPlan:
    """An update the orchestrator will expect: its round and the version it starts from."""

    run_id: str
    client_id: str
    round: int
    base_version: int
    spec: dict[str, TensorSpec]


class Ledger:
    def __init__(self, sessions: sessionmaker[Session], config: GatewayConfig) -> None:
        self.sessions, self.config = sessions, config
        self._models: OrderedDict[tuple[str, int], Model] = OrderedDict()
        self._specs: dict[tuple[str, int], dict[str, TensorSpec]] = {}
        self._tokens: TtlCache[str, ClientRef] = TtlCache(config.cache_ttl_s)
        self._latest: TtlCache[str, int] = TtlCache(config.cache_ttl_s)
        self._runs: set[str] = set()  # runs known to exist (a run is never renamed)
        self._signing_key: str | None = None
        self._lock = threading.Lock()

    def signing_key(self) -> str | None:
        """The orchestrator's public signing key, read once it exists (an orchestrator
        makes it on its first start). The gateway checks registration replies against it,
        so a reply forged on the bus cannot hand an HTTP device another key."""
        if self._signing_key is None:
            with session_scope(self.sessions) as s:
                raw = get_public_key(s, KEY_NAME)
            if raw is not None:
                self._signing_key = encode_key(raw)
        return self._signing_key

    # --- who is calling -----------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Caller:
        if not token:
            raise GatewayError(401, "missing bearer token (Authorization: Bearer <token>)")
        operator = self.config.operator_token
        if operator is not None and hmac.compare_digest(token.encode(), operator.encode()):
            return Caller(token, None)
        digest = q.hash_token(token)
        ref = self._tokens.get(digest)
        if ref is None:
            with session_scope(self.sessions) as s:
                client = q.get_client_by_token_hash(s, digest)
                if client is None:
                    raise GatewayError(401, "unknown bearer token")
                ref = ClientRef(client.id, client.run_id, str(client.state))
            self._tokens.put(digest, ref)
        return Caller(token, ref)

    def client(self, caller: Caller, client_id: str) -> ClientRef:
        """The client ``client_id`` if the caller is it (or the operator)."""
        if caller.client is not None and caller.client.id == client_id:
            return caller.client
        with session_scope(self.sessions) as s:
            row = q.get_client(s, client_id)
            if row is None:
                raise GatewayError(404, f"unknown client {client_id}")
            ref = ClientRef(row.id, row.run_id, str(row.state))
        if caller.client is not None and caller.client.id != ref.id:
            raise GatewayError(403, f"this token belongs to another client than {client_id}")
        return ref

    def run_id(self, run_id: str | None, caller: Caller | None = None) -> str:
        """The run a call is about: named, else the caller's, else the gateway's default."""
        if run_id is None and caller is not None and caller.client is not None:
            run_id = caller.client.run_id
        run_id = run_id or self.config.default_run
        if run_id is None:
            raise GatewayError(400, "no run named: pass run_id (the gateway has no default run)")
        if run_id not in self._runs:
            with session_scope(self.sessions) as s:
                if q.get_run(s, run_id) is None:
                    raise GatewayError(404, f"unknown run {run_id}")
            self._runs.add(run_id)
        if caller is not None and caller.client is not None and caller.client.run_id != run_id:
            raise GatewayError(403, f"this token belongs to a client of another run than {run_id}")
        return run_id

    # --- rounds and models --------------------------------------------------------------------

    def round_info(self, run_id: str) -> RoundInfo:
        with session_scope(self.sessions) as s:
            run = q.get_run(s, run_id)
            if run is None:
                raise GatewayError(404, f"unknown run {run_id}")
            mv = q.latest_model_version(s, run_id)
            info = RoundInfo(
                run_id=run_id,
                run_status=str(run.status),
                model_version=mv.version if mv else None,
                round=None,
                autorun_remaining=run.autorun_remaining,
            )
            rnd = q.latest_round(s, run_id)
            if rnd is None:
                return info
            base = (
                q.get_model_version_by_id(s, rnd.base_version_id) if rnd.base_version_id else None
            )
            parts = q.list_participations(s, rnd.id)
            return info.model_copy(
                update={
                    "round": rnd.number,
                    "attempt": rnd.attempt,
                    "state": str(rnd.state),
                    "base_model_version": base.version if base else None,
                    "selected": [p.client_id for p in parts if p.state != "dropped"],
                    "received": rnd.received,
                    "quorum": rnd.quorum,
                    "deadline": rnd.deadline,
                }
            )

    def model(self, run_id: str, version: int | None = None) -> Model:
        """A global model version (the newest when ``version`` is None). Versions never
        change, so their blobs are cached; which one is the newest is cached ``cache_ttl_s``."""
        wanted = version if version is not None else self._latest.get(run_id)
        if wanted is not None and (cached := self._cached(run_id, wanted)) is not None:
            return cached
        with session_scope(self.sessions) as s:
            mv = (
                q.latest_model_version(s, run_id)
                if version is None
                else q.get_model_version(s, run_id, version)
            )
            if mv is None:
                raise GatewayError(404, f"run {run_id} has no model version {version}")
            if version is None:
                self._latest.put(run_id, mv.version)
            if (cached := self._cached(run_id, mv.version)) is not None:
                return cached
            model = Model(run_id, mv.version, mv.blob_sha, blobstore.get(s, mv.blob_sha))
        with self._lock:
            self._models[(run_id, model.version)] = model
            while len(self._models) > self.config.model_cache:
                self._models.popitem(last=False)
        return model

    def _cached(self, run_id: str, version: int) -> Model | None:
        with self._lock:
            model = self._models.get((run_id, version))
            if model is not None:
                self._models.move_to_end((run_id, version))
            return model

    def spec(self, run_id: str, version: int) -> dict[str, TensorSpec]:
        key = (run_id, version)
        if key not in self._specs:
            try:
                header = peek_header(self.model(run_id, version).blob, self.config.decode_limits)
            except CodecError as e:  # a stored model the codec refuses: not the caller's fault
                raise GatewayError(503, f"model version {version} is unreadable: {e}") from None
            self._specs[key] = dict(header.tensors)
        return self._specs[key]

    def expect_update(
        self, client: ClientRef, round: int | None, base_version: int | None
    ) -> UploadPlan | None:
        """The plan for an update of ``client`` in ``round`` (default: the open round); None
        when its update for that round is already counted (a retry: nothing to do)."""
        with session_scope(self.sessions) as s:
            rnd = (
                q.get_open_round(s, client.run_id)
                if round is None
                else q.get_round(s, client.run_id, round)
            )
            if rnd is None:
                what = "no round is open" if round is None else f"round {round} does not exist"
                raise GatewayError(409 if round is None else 404, what)
            part = next(
                (p for p in q.list_participations(s, rnd.id) if p.client_id == client.id), None
            )
            if part is not None and part.state == ParticipationState.UPDATE:
                return None
            if rnd.state != RoundState.OPEN:
                raise GatewayError(409, f"round {rnd.number} is not open (it is {rnd.state})")
            if part is None or part.state not in (
                ParticipationState.SELECTED,
                ParticipationState.TRAINING,
            ):
                raise GatewayError(409, f"{client.id} is not expected in round {rnd.number}")
            if base_version is None:
                base = (
                    q.get_model_version_by_id(s, rnd.base_version_id)
                    if rnd.base_version_id
                    else None
                )
                if base is None:
                    raise GatewayError(409, f"round {rnd.number} has no base model version")
                base_version = base.version
            elif q.get_model_version(s, client.run_id, base_version) is None:
                raise GatewayError(404, f"run {client.run_id} has no model version {base_version}")
            number = rnd.number
            run = q.get_run(s, client.run_id)
            secure = run is not None and (run.config or {}).get("secagg") is not None
        spec = self.spec(client.run_id, base_version)
        # A secure run's update is the masked vector and nothing else (as the ingest says).
        return UploadPlan(
            client.run_id,
            client.id,
            number,
            base_version,
            masked_spec(spec) if secure else spec,
        )
