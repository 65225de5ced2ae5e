"""A device's identity on disk, so that a restarted device resumes as the client it was.

Without it every start registers anew: the run fills with written-off clients, and with
per-device broker users the broker with users no one uses. The file holds the run id, the
client id, the token, the broker user name and the orchestrator's public signing key the
device pinned at registration (so a restarted device keeps trusting that key, and only
it); it is a secret (the token is the device's
password), so it is written with mode 0600, atomically (a crash mid-write leaves the old file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

from devices.wire import Identity
from protocol.signing import SignatureError, decode_public_key

log = logging.getLogger(__name__)

_IDENT = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def load_identity(path: Path, run_id: str) -> Identity | None:
    """The identity stored at ``path`` for ``run_id``; None when there is none, it is for
    another run, or the file cannot be read (then the device registers anew)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring the unreadable identity file %s: %s", path, e)
        return None
    if not isinstance(raw, dict) or raw.get("run_id") != run_id:
        return None
    cid, token, user = raw.get("client_id"), raw.get("token"), raw.get("broker_user")
    key = raw.get("signing_key")
    if not (
        isinstance(cid, str)
        and _IDENT.fullmatch(cid)
        and isinstance(token, str)
        and 16 <= len(token) <= 128
        and (user is None or (isinstance(user, str) and _IDENT.fullmatch(user)))
        and (key is None or _is_key(key))
    ):
        log.warning("ignoring the malformed identity file %s", path)
        return None
    return Identity(run_id, cid, token, user, key)


def _is_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    try:
        decode_public_key(key)
    except SignatureError:
        return False
    return True


def save_identity(path: Path, ident: Identity) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    data = {
        "run_id": ident.run_id,
        "client_id": ident.client_id,
        "token": ident.token,
        "broker_user": ident.broker_user,
        "signing_key": ident.signing_key,
    }
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def forget_identity(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
