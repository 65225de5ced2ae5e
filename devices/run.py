"""``run_device``: one device as a process (what ``fedmq device`` calls).

Connects to ``config.wire.broker_url`` (``memory://<name>`` shares the in-process bus of that name
with the rest of the process; ``amqp://`` is RabbitMQ), or with ``transport="http"`` talks to
the REST gateway at ``config.wire.gateway_url``; builds the device's model and loads
its own partition, and runs a ``FederatedClient`` on the calling thread until
``stop_event`` is set, SIGTERM or Ctrl-C arrives, or ``config.stop_after_rounds`` rounds are
trained; then it leaves cleanly (``offline`` signal, queue deleted) and closes its bus.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from urllib.parse import quote, urlsplit, urlunsplit

from devices.client import FederatedClient, RoundCallback
from devices.config import DeviceConfig
from devices.local import LocalTrainer
from devices.training import SharedCompute
from devices.transport import BusTransport, Transport
from protocol.bus import Bus, connect

log = logging.getLogger(__name__)


def run_device(
    config: DeviceConfig,
    stop_event: threading.Event | None = None,
    on_round: RoundCallback | None = None,
    compute: SharedCompute | None = None,
    trainer: LocalTrainer | None = None,
) -> FederatedClient:
    """Run one device until stopped; returns the client (its ``sent``, ``errors`` ...).
    Devices run as threads of one process share ``compute`` (see ``TrainingSlot``);
    ``trainer``: one other than the config's (a split device's ``SplitTrainer``)."""
    if config.training.torch_threads is not None:
        import torch

        torch.set_num_threads(config.training.torch_threads)
    stop = stop_event or threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_term(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        if config.simulated.join_delay_s > 0:  # a late joiner: not even connected before its time
            log.info("%s: joins in %.1f s", config.name, config.simulated.join_delay_s)
            stop.wait(config.simulated.join_delay_s)
        transport = _transport(config)
    except BaseException:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        raise
    client = FederatedClient(config, transport, trainer=trainer, on_round=on_round, compute=compute)
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
        if config.wire.transport == "http" or not config.wire.broker_url.startswith("memory:"):
            transport.close()  # a named in-process bus belongs to the whole process
    return client


def _transport(config: DeviceConfig) -> Transport:
    if config.wire.transport == "http":
        from devices.http import HttpTransport  # httpx is loaded only where it is used

        assert config.wire.gateway_url is not None
        return HttpTransport(config.wire.gateway_url, bus=config.wire.bus)
    bus = connect(config.wire.broker_url, config.wire.bus)
    if config.wire.broker_url.startswith("memory:"):
        return BusTransport(bus)

    def connect_as(user: str, password: str) -> Bus:
        return connect(with_credentials(config.wire.broker_url, user, password), config.wire.bus)

    return BusTransport(bus, connect_as)


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` (``amqp[s]://…``) with its user and password replaced."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
