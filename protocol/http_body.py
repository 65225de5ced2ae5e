"""An HTTP request body read with a size cap, for every HTTP server fedmq runs (the REST
gateway's uploads, the browser device's codec routes).

Framework-free: it takes the declared ``Content-Length`` and the body as an async stream of
parts (Starlette's ``request.stream()``), and raises ``BodyRefused`` with the status and
reason a server answers. The declared length is checked before anything is read, and the
stream is read only up to ``limit`` bytes: a chunked body with no length holds at most
``limit`` bytes in memory, however much more the sender has.
"""

from __future__ import annotations

from collections.abc import AsyncIterable

# Longer than any limit a server sets; int() of a longer string is not even attempted.
_MAX_LENGTH_DIGITS = 18


class BodyRefused(Exception):
    """The body was not read: ``status`` (400 or 413) and a ``reason`` a person can act on."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


async def read_limited(declared: str | None, parts: AsyncIterable[bytes], limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes of it.

    ``declared`` is the request's ``Content-Length`` header (None when it has none, as for
    a chunked body): not a plain decimal count → 400; over ``limit`` → 413 before a byte is
    read. Then ``parts`` is read until the body would pass ``limit`` (413) or ends.
    """
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BodyRefused(400, f"Content-Length {declared[:40]!r} is not a byte count")
        if len(declared) > _MAX_LENGTH_DIGITS or int(declared) > limit:
            raise BodyRefused(413, f"body of {declared} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for part in parts:
        if len(body) + len(part) > limit:
            raise BodyRefused(413, f"body exceeds the limit of {limit} bytes")
        body += part
    return bytes(body)
