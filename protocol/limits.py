"""Registration limits (issue 17, finding 4): a rate per source, a cap per run, a cap on the
size of a device's ``device_info``.

Registration is the one thing anyone who reaches the broker or the gateway may do, and each
one costs a client row, a snapshot part and, through the gateway, a device queue. Unbounded,
1,000 ``POST /client`` calls in 90 s made 1,000 rows and 1,000 durable queues, and the broker
could not restart afterwards. Now:

- **Per source, a token bucket** (``TokenBuckets``): ``burst`` registrations at once, then
  ``rate_per_s``. The gateway keys it by the caller's address; the orchestrator by the broker
  user that published the ``Register`` (AMQP's ``user_id``, which the broker checks against
  the connection's login). Devices that share one broker user (the enrollment user) share
  one bucket there, so the orchestrator's defaults are sized to a whole fleet re-registering
  at once (benchmarks/load.py: 10,000 devices at ~950/s), and the per-address limit at the
  gateway is the tight one. Buckets live in each process: N replicas or gateways allow N
  times the rate.
- **Per run, a cap** on registered clients (every client row of the run, those that left
  included: each one is a row and a part of the run's snapshot). Checked against what is
  committed, so two replicas registering into one run at the same moment may pass it by
  one batch.
- **``device_info``** at most ``max_device_info_bytes`` as compact JSON.

A refusal is an answer, not silence: the orchestrator sends the device an ``Event(kind=
"register.rejected", correlation_id=<the Register's message id>, detail={reason,
retry_after_s})`` on its reply queue, and the gateway answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

REGISTER_REJECTED = "register.rejected"


@dataclass(frozen=True)
class RegistrationLimits:
    # Per source (a broker user at the orchestrator, an address at the gateway).
    rate_per_s: float = 1000.0
    burst: int = 10_000
    max_clients_per_run: int = 100_000
    max_device_info_bytes: int = 4096
    # What a refusal for the cap tells the device to wait: the cap moves only when an
    # operator raises it, so retrying at once would only load the orchestrator.
    cap_retry_after_s: float = 60.0


def device_info_bytes(info: Mapping[str, Any]) -> int:
    """The size a ``device_info`` map is measured by: compact JSON, UTF-8."""
    return len(json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode())


def device_info_refusal(info: Mapping[str, Any], limit: int) -> str | None:
    size = device_info_bytes(info)
    if size <= limit:
        return None
    return f"device_info is {size} bytes, more than the {limit} allowed"


def cap_refusal(run_id: str, registered: int, cap: int) -> str | None:
    if registered < cap:
        return None
    return f"run {run_id} has reached its cap of {cap} registered clients"


class TokenBuckets:
    """One token bucket per key: ``burst`` tokens, refilled at ``rate_per_s``.

    At most ``max_keys`` buckets are kept (least recently used dropped first), so a caller
    cycling through addresses costs memory up to that bound; a dropped bucket comes back
    full, which lets such a caller through no faster than ``burst`` per new key anyway.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(
                f"a token bucket needs rate > 0 and burst >= 1 ({rate_per_s}, {burst})"
            )
        self.rate, self.burst, self.max_keys, self.clock = rate_per_s, burst, max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 if it had one, else the seconds until it will."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` takes whole seconds; never 0 (that invites an immediate retry)."""
    return str(max(1, math.ceil(seconds)))
