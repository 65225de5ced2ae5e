"""The codec's single error type."""

from __future__ import annotations


class CodecError(ValueError):
    """A tensor blob cannot be encoded or decoded; the message says what is wrong.

    Every failure of ``encode`` and ``decode`` raises this type (and only this type), so a
    consumer can reject a bad message with one ``except`` and dead-letter it.
    """
