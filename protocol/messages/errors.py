from __future__ import annotations


class MessageError(ValueError):
    """A message that is not a valid fedmq message; ``str(err)`` says what is wrong.

    Consumers dead-letter the message with this text as the reason.
    """
