"""``run_device``: one device as a process (what ``fedmq device`` calls).

Connects to ``config.broker_url`` (``memory://<name>`` shares the in-process bus of that name
with the rest of the process; ``amqp://`` is RabbitMQ), builds the device's model and loads
its own partition, and runs a ``FederatedClient`` on the calling thread until
``stop_event`` is set, SIGTERM or Ctrl-C arrives, or ``config.stop_after_rounds`` rounds are
trained; then it leaves cleanly (``offline`` signal, queue deleted) and closes its bus.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from devices.client import FederatedClient, RoundCallback
from devices.config import DeviceConfig
from protocol.bus import connect

log = logging.getLogger(__name__)


def run_device(
    config: DeviceConfig,
    stop_event: threading.Event | None = None,
    on_round: RoundCallback | None = None,
) -> FederatedClient:
    """Run one device until stopped; returns the client (its ``sent``, ``errors`` ...)."""
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    stop = stop_event or threading.Event()
    bus = connect(config.broker_url, config.bus)
    client = FederatedClient(config, bus, on_round=on_round)
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_term(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        client.run(stop)
    except KeyboardInterrupt:
        log.info("%s: interrupted; leaving", config.name)
        stop.set()
        if client.client_id is not None and not client.left:
            client._leave()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not config.broker_url.startswith("memory:"):
            bus.close()  # a named in-process bus belongs to the whole process
    return client
