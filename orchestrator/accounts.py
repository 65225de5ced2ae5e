"""Per-device broker users: created at registration, deleted when a device is kicked.

With accounts on, a device registers through the shared enrollment user (which can do
nothing else, protocol/permissions.py), and the orchestrator creates a RabbitMQ user named
after the new client id, with the client's token as password and permissions that hold it to
its own routing keys and queue. The broker then refuses, by itself, a device that publishes
under another's key or reads another's queue; the token check in the orchestrator stays as
the second line.

Users are made through the RabbitMQ management HTTP API (``PUT /api/users/<name>``,
``/api/permissions/...``, ``/api/topic-permissions/...``), which needs a management user
with the ``administrator`` tag: the orchestrator holds that credential and nothing else does.
Every call is idempotent (PUT, and DELETE answering 404 for a user already gone), so a
registration redelivered after a crash, or a revocation drained twice, changes nothing twice.
"""

from __future__ import annotations

import logging
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from protocol.permissions import Permissions, device_account, enrollment

log = logging.getLogger(__name__)


class AccountError(RuntimeError):
    """The broker's management API refused or could not be reached."""


class BrokerAccounts(Protocol):
    def provision(self, client_id: str, password: str) -> str:
        """Create (or reset) the user for ``client_id``; returns its user name."""
        ...

    def revoke(self, client_id: str) -> None:
        """Delete the user and close its connections; a user already gone is fine."""
        ...


class ManagementAccounts:
    """``BrokerAccounts`` on the RabbitMQ management API at ``api_url``
    (``http://user:password@host:15672``) for the devices of ``vhost``."""

    def __init__(self, api_url: str, vhost: str, *, timeout_s: float = 10.0) -> None:
        parts = urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # The URL holds a password: it is not repeated in the message.
            raise ValueError("the broker accounts URL must be http(s)://user:password@host:port")
        auth = (unquote(parts.username or ""), unquote(parts.password or ""))
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.vhost = vhost
        self._client = httpx.Client(base_url=base, auth=auth, timeout=timeout_s)

    def _path(self, *parts: str) -> str:
        return "/api/" + "/".join(quote(p, safe="") for p in parts)

    def _call(self, method: str, path: str, json: object = None, ok: tuple[int, ...] = ()) -> None:
        try:
            r = self._client.request(method, path, json=json)
        except httpx.HTTPError as e:
            raise AccountError(f"broker management API: {method} {path}: {e}") from e
        if r.status_code >= 300 and r.status_code not in ok:
            raise AccountError(
                f"broker management API: {method} {path}: {r.status_code} {r.text[:200]}"
            )

    def provision(self, client_id: str, password: str) -> str:
        self._user(client_id, password, device_account(client_id))
        return client_id

    def provision_enrollment(self, user: str, password: str) -> None:
        """Create (or reset) the shared user devices register with, and nothing more
        (``protocol.permissions.enrollment``)."""
        self._user(user, password, enrollment())

    def _user(self, user: str, password: str, perms: Permissions) -> None:
        self._call("PUT", self._path("users", user), {"password": password, "tags": ""})
        self._call(
            "PUT",
            self._path("permissions", self.vhost, user),
            {"configure": perms.configure, "write": perms.write, "read": perms.read},
        )
        for t in perms.topics:
            self._call(
                "PUT",
                self._path("topic-permissions", self.vhost, user),
                {"exchange": t.exchange, "write": t.write, "read": t.read},
            )

    def is_administrator(self) -> bool:
        """Whether the API answers and its user may manage users (the ``administrator``
        tag); False when it does not answer."""
        try:
            r = self._client.get(self._path("whoami"))
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
        tags = r.json().get("tags", [])
        if isinstance(tags, str):  # RabbitMQ before 3.9 answered a comma-separated string
            tags = tags.split(",")
        return "administrator" in tags

    def revoke(self, client_id: str) -> None:
        self._call("DELETE", self._path("users", client_id), ok=(404,))
        # Deleting a user does not close the connections it already has.
        self._call("DELETE", self._path("connections", "username", client_id), ok=(404,))

    def exists(self, client_id: str) -> bool:
        try:
            r = self._client.get(self._path("users", client_id))
        except httpx.HTTPError as e:
            raise AccountError(f"broker management API: {e}") from e
        return r.status_code == 200

    def close(self) -> None:
        self._client.close()


def vhost_of(broker_url: str) -> str:
    """The vhost an ``amqp://`` URL names (``/`` when it names none)."""
    path = urlsplit(broker_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"
