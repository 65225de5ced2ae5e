"""How a device reaches the federation: one small interface, two adapters.

``BusTransport`` speaks the bus directly (AMQP, or the in-process bus); ``HttpTransport``
(devices/http.py) goes through the REST gateway, which turns every call into the same bus
message. ``FederatedClient`` holds one ``Transport`` and never knows which.

Errors: a ``BusError`` (or ``LinkError``, one of them) means the link failed and the client
backs off and recovers (``attach`` again, ``join`` + ``ready``, resend what failed).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

from devices import wire
from devices.wire import Identity
from protocol import topology
from protocol.bus import Bus, BusError
from protocol.messages import ClientState, Envelope, UpdateMeta


class LinkError(BusError):
    """The device's link to the federation failed (a transport error, translated)."""


class TrustError(Exception):
    """The federation answered with an orchestrator key the device does not trust (not the
    one it pinned): retrying cannot help, the device stops."""


class Inbound(Protocol):
    """One message for the device: a ``protocol.bus.Delivery`` or its HTTP look-alike. An
    optional ``local`` attribute, True, marks what a transport made itself from a trusted
    answer (devices/http.py): the client then looks for no orchestrator signature on it."""

    body: bytes
    headers: dict[str, Any]

    def ack(self) -> None: ...

    def reject(self, reason: str) -> None: ...


class Transport(ABC):
    @abstractmethod
    def register(
        self,
        run_id: str,
        display_name: str,
        *,
        device_info: dict[str, Any],
        timeout_s: float,
        poll_s: float,
        stopping: Callable[[], bool],
        expected_key: str | None = None,
    ) -> Identity | None:
        """Join ``run_id``; None if ``stopping()`` turned true first. The identity carries
        the orchestrator's signing key, which must be ``expected_key`` if that is given."""

    @abstractmethod
    def attach(self, ident: Identity) -> None:
        """(Re)create what receiving needs (the device queue); idempotent."""

    def resume(self, ident: Identity) -> None:
        """Go on as ``ident``, a registration kept from an earlier start (raises
        ``BusError`` when that is not possible, e.g. its broker user is gone)."""
        self.attach(ident)

    @abstractmethod
    def signal(self, ident: Identity, state: ClientState) -> None: ...

    @abstractmethod
    def heartbeat(self, ident: Identity) -> None: ...

    def send_stage(self, ident: Identity, msg: Envelope) -> None:
        """A SecAgg+ stage message (keys, share boxes, revealed shares), signed with the
        device's MAC, to the orchestrator."""
        raise LinkError(f"{type(self).__name__} cannot take part in secure rounds")

    @abstractmethod
    def send_update(self, meta: UpdateMeta, blob: bytes, chunk_size: int) -> None:
        """Returns once the whole update is handed over (or raises ``BusError``)."""

    @abstractmethod
    def receive(self, ident: Identity, timeout: float) -> Inbound | None:
        """The next message for the device (model chunks, announcements, notices)."""

    @abstractmethod
    def leave(self, ident: Identity) -> None:
        """Signal ``offline`` and give up the device queue for good."""

    @abstractmethod
    def backoff(self, attempt: int) -> float: ...

    def fatal(self, error: BusError) -> bool:
        """True when retrying cannot help (the transport itself was closed)."""
        return False

    def close(self) -> None:  # noqa: B027 - most transports hold nothing of their own
        """Release what the transport owns."""


class BusTransport(Transport):
    """The device on the bus itself, as docs/architecture.md "Wire conventions" describes.

    With ``connect_as`` (user, password -> a new ``Bus`` to the same broker) the device asks
    for a broker user of its own when it registers; if the orchestrator made one, the device
    drops the shared enrollment connection and goes on as that user (protocol/permissions.py).
    """

    def __init__(self, bus: Bus, connect_as: Callable[[str, str], Bus] | None = None) -> None:
        self.bus = bus
        self.connect_as = connect_as

    def register(
        self,
        run_id: str,
        display_name: str,
        *,
        device_info: dict[str, Any],
        timeout_s: float,
        poll_s: float,
        stopping: Callable[[], bool],
        expected_key: str | None = None,
    ) -> Identity | None:
        ident = wire.register(
            self.bus,
            run_id,
            display_name,
            device_info=device_info,
            broker_account=self.connect_as is not None,
            timeout_s=timeout_s,
            poll_s=poll_s,
            stopping=stopping,
            expected_key=expected_key,
        )
        if ident is None:
            return None
        self._become(ident)
        self.attach(ident)
        return ident

    def resume(self, ident: Identity) -> None:
        self._become(ident)
        self.attach(ident)  # on its own user: fails if the user was deleted (kicked)

    def _become(self, ident: Identity) -> None:
        """Drop the shared enrollment connection for the device's own broker user."""
        if ident.broker_user is None or self.connect_as is None:
            return
        own = self.connect_as(ident.broker_user, ident.token)
        enrollment, self.bus = self.bus, own
        with contextlib.suppress(BusError):
            enrollment.close()

    def attach(self, ident: Identity) -> None:
        topology.declare_device(self.bus, ident.client_id, ident.run_id)

    def signal(self, ident: Identity, state: ClientState) -> None:
        wire.send_signal(self.bus, ident, state)

    def heartbeat(self, ident: Identity) -> None:
        wire.send_heartbeat(self.bus, ident)

    def send_stage(self, ident: Identity, msg: Envelope) -> None:
        wire.send_stage(self.bus, ident, msg)

    def send_update(self, meta: UpdateMeta, blob: bytes, chunk_size: int) -> None:
        wire.publish_update(self.bus, meta, blob, chunk_size)

    def receive(self, ident: Identity, timeout: float) -> Inbound | None:
        return self.bus.get(topology.device_queue(ident.client_id), timeout=timeout)

    def leave(self, ident: Identity) -> None:
        wire.send_signal(self.bus, ident, ClientState.OFFLINE)
        self.bus.delete_queue(topology.device_queue(ident.client_id))

    def backoff(self, attempt: int) -> float:
        return self.bus.config.backoff(attempt)

    def fatal(self, error: BusError) -> bool:
        return "closed" in str(error)  # our own bus was closed under us

    def close(self) -> None:
        with contextlib.suppress(BusError):
            self.bus.close()
