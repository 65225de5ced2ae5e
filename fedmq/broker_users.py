"""Per-device broker users by default under `fedmq up`, where RabbitMQ's management API
answers (issue 17: with one shared broker user, anyone holding it could read and bind
every queue).

When the broker URL's user may manage users on the management API (port 15672 of the
broker's host, or ``FEDMQ_BROKER_ACCOUNTS_URL``), `fedmq up` makes a shared enrollment user
for its vhost, which may register and do nothing else (``protocol.permissions.enrollment``),
with a generated password kept 0600 in the data folder. The orchestrator gets the management
API (it gives each registering device a user of its own, held to its own keys and queue);
the fleet's devices get the enrollment user's URL. Services that speak for many devices
(orchestrator, worker, gateway, dashboard) keep the stack's own user.

Where the API does not answer, or its user may not manage users, devices share the broker
URL's user, and `fedmq up` says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from rich.console import Console

from devices.run import with_credentials
from fedmq import operator_token
from fedmq.settings import Settings
from orchestrator.accounts import AccountError, ManagementAccounts, vhost_of

MANAGEMENT_PORT = 15672
PASSWORD_FILE = "broker-enrollment"


@dataclass(frozen=True)
class BrokerUsers:
    accounts_url: str  # the management API, with a user that may manage users
    device_broker_url: str  # the enrollment user's AMQP URL


def management_url(broker_url: str, port: int = MANAGEMENT_PORT) -> str:
    """``http://user:password@host:port`` with the credentials of ``broker_url``."""
    parts = urlsplit(broker_url)
    user = quote(unquote(parts.username or "guest"), safe="")
    password = quote(unquote(parts.password or "guest"), safe="")
    host = parts.hostname or "localhost"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{user}:{password}@{host}:{port}"


def enrollment_user(vhost: str) -> str:
    """One per vhost: users are the broker's, permissions the vhost's."""
    return "fedmq-enroll" + ("" if vhost == "/" else "-" + re.sub(r"[^A-Za-z0-9_.-]", "_", vhost))


def prepare(settings: Settings, console: Console) -> BrokerUsers | None:
    """The enrollment user made (or its password reset to the kept one) and the URLs the
    services need; None, said why, where devices must share the broker URL's user."""
    url = (
        settings.broker_accounts_url.get_secret_value()
        if settings.broker_accounts_url
        else management_url(settings.broker_url)
    )
    vhost = vhost_of(settings.broker_url)
    user = enrollment_user(vhost)
    api = ManagementAccounts(url, vhost, timeout_s=5.0)
    try:
        if not api.is_administrator():
            console.print(
                "[yellow]no RabbitMQ management API that may manage users (set "
                "FEDMQ_BROKER_ACCOUNTS_URL): devices share the broker URL's user[/yellow]"
            )
            return None
        password, _ = operator_token.load_or_create(settings.data_dir / PASSWORD_FILE)
        api.provision_enrollment(user, password)
    except AccountError as e:
        console.print(f"[yellow]broker users not set up ({e}); devices share one user[/yellow]")
        return None
    finally:
        api.close()
    console.print(
        f"devices register as {user!r} and get broker users of their own "
        f"(password in {(settings.data_dir / PASSWORD_FILE).resolve()}, mode 0600)"
    )
    return BrokerUsers(url, with_credentials(settings.broker_url, user, password))
