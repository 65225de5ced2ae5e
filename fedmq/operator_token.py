"""The operator token: never a value anyone can read in fedmq's source.

Before, an unset ``FEDMQ_OPERATOR_TOKEN`` meant a constant written in ``fedmq/settings.py``,
so anyone who reached the gateway or the broker could kick devices and stop autorun. Now:

- a service that listens on anything but loopback refuses to start without a token set;
- a token that appears in fedmq's own source, docs or templates is refused by every
  network-facing service, set or not (``PUBLIC_TOKENS``);
- ``fedmq up`` generates one on first start (``load_or_create``), keeps it in a 0600 file
  under the data dir and passes it to its services; later starts reuse it, and
  ``fedmq command`` on the same machine finds it there;
- without one, the orchestrator refuses every command and the gateway has no operator.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from fedmq.settings import Settings

if TYPE_CHECKING:
    from rich.console import Console

TOKEN_FILE = "operator-token"
MIN_LENGTH = 16
# Values printed in this repository (the old built-in default, the templates' examples):
# a service someone else can reach must never accept them.
PUBLIC_TOKENS = frozenset({"fedmq-dev-operator-token", "change-me-operator-token"})
GENERATE_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class TokenError(RuntimeError):
    """A service may not start with this operator token; the text says what to do."""


def token_path(settings: Settings) -> Path:
    return settings.data_dir / TOKEN_FILE


def configured(settings: Settings) -> str | None:
    """The explicitly set token (``FEDMQ_OPERATOR_TOKEN``), None when unset or empty."""
    if settings.operator_token is None:
        return None
    return settings.operator_token.get_secret_value() or None


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def require(settings: Settings, service: str, host: str | None = None) -> str | None:
    """The token ``service`` may run with (None: no operator), or ``TokenError``.

    ``host``: the address it listens on; None for a service that listens on nothing but
    takes commands from the broker (the orchestrator)."""
    token = configured(settings)
    if token is not None:
        if token in PUBLIC_TOKENS:
            raise TokenError(
                f"{service}: FEDMQ_OPERATOR_TOKEN is an example value printed in fedmq's "
                f"source and templates; set a secret of your own ({GENERATE_HINT})"
            )
        if len(token) < MIN_LENGTH:
            raise TokenError(
                f"{service}: FEDMQ_OPERATOR_TOKEN is shorter than {MIN_LENGTH} characters"
            )
        return token
    if host is not None and not is_loopback(host):
        raise TokenError(
            f"{service} would listen on {host} without FEDMQ_OPERATOR_TOKEN set: set one "
            f"({GENERATE_HINT}), or listen on 127.0.0.1 only"
        )
    return None


def load_or_create(path: Path) -> tuple[str, bool]:
    """The token kept in ``path``, made (0600, in a 0700 folder) if there is none yet;
    True when it was made now."""
    try:
        return _read(path), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        # O_EXCL: two starts at once keep one token; the mode is set at creation, so the
        # secret is never readable by others, not even for an instant.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path), False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return token, True


def find(settings: Settings) -> str | None:
    """The token an operator's command on this machine uses: the one set, else the one
    ``fedmq up`` keeps under the data dir, else None."""
    token = configured(settings)
    if token is not None:
        return token
    try:
        return _read(token_path(settings))
    except FileNotFoundError:
        return None


def _read(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 it, "
            "or delete it and a new token is made"
        )
    token = path.read_text().strip()
    if len(token) < MIN_LENGTH or token in PUBLIC_TOKENS:
        raise TokenError(f"{path} does not hold a usable token: delete it and one is made")
    return token


def or_exit(settings: Settings, service: str, host: str | None, console: Console) -> str | None:
    """``require`` for a command line: the token, or exit 2 saying why. A service with its
    own in-process bus and no listening socket is reachable by nobody else: anything goes."""
    import typer

    if settings.embedded and host is None:
        return configured(settings)
    try:
        token = require(settings, service, host)
    except TokenError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    if token is None:
        console.print(
            f"[yellow]{service}: FEDMQ_OPERATOR_TOKEN is not set, so it takes no operator "
            "commands[/yellow]"
        )
    return token
