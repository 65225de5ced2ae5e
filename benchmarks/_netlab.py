"""A small network and compute lab for benchmarks: shaped links and CPU budgets.

``Lab`` gives each simulated device

- a **link**: its own network namespace joined to the host by a veth pair, shaped on
  both ends with ``tc netem`` (delay, jitter, loss) under a ``tbf`` (bandwidth); the
  device reaches RabbitMQ at the host end's address through a ``socat`` (or Python) relay
  bound to that address only, since the broker listens on 127.0.0.1, which a namespace
  cannot reach. Where namespaces cannot be made (not root, no iproute2), the fallback is
  a shaping relay on 127.0.0.1 in user space (delay, jitter and bandwidth per direction;
  no loss): ``Lab.mode`` says which was used;
- a **compute budget**: its own cgroup (v1 ``cpu`` or v2) with a CFS quota of ``1/N``
  of a core, so the kernel throttles the device's process while it computes: a device
  ``N`` times slower than an unthrottled core. Without a writable cgroup there is no
  budget (``Lab.budget`` says so).

Everything is named after this process's pid, made under ``10.213.0.0/16`` (checked
unused) and removed by ``close()``, which ``atexit`` and SIGTERM also run: a failed
benchmark leaves no namespace, interface, relay or cgroup behind.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

BROKER_PORT = 5672
SHARES_V1 = 8192  # 8x a default process's weight
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Link:
    name: str
    rate_mbit: float
    delay_ms: float  # one way, on each direction
    jitter_ms: float
    loss_pct: float

    def describe(self, netem: bool = True) -> str:
        loss = f"{self.loss_pct:g}% loss" if netem else "no loss (no netem in this kernel)"
        return (
            f"{self.rate_mbit:g} Mbit/s, {self.delay_ms:g} ms one way (+/- {self.jitter_ms:g} "
            f"ms), {loss}"
        )


@dataclass(frozen=True)
class Profile:
    name: str
    slowdown: float  # the device computes this many times slower than one whole core


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def namespaces_available() -> tuple[bool, str]:
    """(True, "") when this process can make namespaces and shape veths, else the reason."""
    if os.geteuid() != 0:
        return False, "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"no `{tool}` (iproute2)"
    probe = f"fmprobe{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return False, f"`ip netns add` failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return True, ""


def netem_available(tag: str) -> bool:
    """Whether this kernel has ``sch_netem`` (probed on a throwaway veth pair)."""
    a, b = f"{tag}pa", f"{tag}pb"
    if _run("ip", "link", "add", a, "type", "veth", "peer", "name", b, check=False).returncode:
        return False
    try:
        probe = ("tc", "qdisc", "add", "dev", a, "root", "netem", "delay", "1ms")
        return _run(*probe, check=False).returncode == 0
    finally:
        _run("ip", "link", "del", a, check=False)


def _cgroup_root() -> tuple[str, Path] | None:
    """("v1" | "v2", the directory to make device cgroups in), if writable."""
    if (CGROUP_V1 / "cpu.cfs_quota_us").exists() and os.access(CGROUP_V1, os.W_OK):
        return "v1", CGROUP_V1
    controllers = CGROUP_V2 / "cgroup.controllers"
    writable = os.access(CGROUP_V2, os.W_OK)
    if controllers.exists() and "cpu" in controllers.read_text().split() and writable:
        return "v2", CGROUP_V2
    return None


def _addresses_in_use() -> str:
    return _run("ip", "-o", "addr", check=False).stdout + _run("ip", "route", check=False).stdout


class _Relay:
    """A TCP relay from ``listen`` to the broker, shaping in user space when asked."""

    def __init__(self, host: str, port: int, link: Link | None, core: int | None) -> None:
        self.host, self.port = host, port
        args = [sys.executable, __file__, "relay", host, str(port)]
        if link is not None:
            args += [str(link.rate_mbit), str(link.delay_ms), str(link.jitter_ms)]
        if link is None and shutil.which("socat"):
            args = [
                "socat",
                f"TCP-LISTEN:{port},bind={host},reuseaddr,fork",
                f"TCP:127.0.0.1:{BROKER_PORT},nodelay",
            ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        if core is not None:
            os.sched_setaffinity(self.proc.pid, {core})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"relay on {host}:{port} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Lab:
    """Shaped links and CPU budgets for ``devices`` device processes (see the module)."""

    def __init__(self, devices: int, *, device_core: int | None, force_fallback: bool = False):
        self.devices = devices
        self.device_core = device_core
        self.tag = f"fm{os.getpid() % 100000}"
        ok, why = (False, "asked for the fallback") if force_fallback else namespaces_available()
        self.mode = "namespaces" if ok else "relay"
        self.fallback_reason = why
        self.cgroup = _cgroup_root()
        self.budget = (
            f"cgroup {self.cgroup[0]} CFS quota" if self.cgroup else "none (no writable cgroup)"
        )
        self._made_ns: list[str] = []
        self._made_cg: list[Path] = []
        self._relays: list[_Relay] = []
        self._closed = False
        self._subnet = self._free_subnet() if ok else ""
        self.netem = ok and netem_available(self.tag)
        atexit.register(self.close)
        self._old_term = signal.signal(signal.SIGTERM, self._on_term)

    def describe(self) -> str:
        """What made the links, for the report."""
        if self.mode != "namespaces":
            return (
                "a shaping relay in user space on 127.0.0.1 (delay, jitter, bandwidth; no "
                f"loss), the fallback: namespaces unavailable ({self.fallback_reason})"
            )
        if self.netem:
            return (
                "a network namespace per device, veth pair to the host, `tc netem` (delay, "
                "jitter, loss) + `tbf` (bandwidth) on both ends, RabbitMQ reached through "
                "`socat` on the host end's address"
            )
        return (
            "a network namespace per device, veth pair to the host, `tbf` (bandwidth) on "
            "both ends; this kernel has no `sch_netem`, so delay and jitter are added by the "
            "relay on the host end's address that reaches RabbitMQ (each direction, in "
            "order), and **loss is not emulated**"
        )

    def _on_term(self, signum: int, frame: object) -> None:
        # Unwind: the callers' ``finally`` blocks end their children first, then ``close``
        # (or ``atexit``) removes the lab; closing here, under live children, would wait.
        raise SystemExit(128 + signum)

    def _free_subnet(self) -> str:
        used = _addresses_in_use()
        for k in range(250):
            third = (os.getpid() + k) % 250 + 1
            if f"10.213.{third}." not in used:
                return f"10.213.{third}"
        raise RuntimeError("no free 10.213.x.0/24 subnet")

    # --- links ------------------------------------------------------------------------

    def namespace(self, i: int) -> str | None:
        name = f"{self.tag}d{i}"
        return name if name in self._made_ns else None  # none before the links are up

    def broker_url(self, i: int) -> str:
        """The AMQP URL device ``i`` uses, from inside its namespace (or on the host)."""
        if self.mode == "namespaces":
            return f"amqp://guest:guest@{self._subnet}.{4 * i + 1}:{BROKER_PORT}/%2F"
        return f"amqp://guest:guest@127.0.0.1:{self._relays[i].port}/%2F"

    def up(self, link: Link) -> None:
        """Make (or remake) every device's shaped link."""
        if self._closed:
            raise RuntimeError("the lab is closed")
        self.down_links()
        for i in range(self.devices):
            if self.mode == "namespaces":
                self._veth(i, link)
            else:
                port = 25700 + (os.getpid() % 1000) * 8 + i
                self._relays.append(_Relay("127.0.0.1", port, link, self.device_core))

    def _veth(self, i: int, link: Link) -> None:
        ns, host_if, dev_if = f"{self.tag}d{i}", f"{self.tag}h{i}", f"{self.tag}v{i}"
        host_ip, dev_ip = f"{self._subnet}.{4 * i + 1}", f"{self._subnet}.{4 * i + 2}"
        _run("ip", "netns", "add", ns)
        self._made_ns.append(ns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", dev_if)
        _run("ip", "link", "set", dev_if, "netns", ns)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        inside = ("ip", "netns", "exec", ns)
        _run(*inside, "ip", "addr", "add", f"{dev_ip}/30", "dev", dev_if)
        _run(*inside, "ip", "link", "set", dev_if, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        for prefix, dev in (((), host_if), (inside, dev_if)):
            self._shape(prefix, dev, link)
        # With netem the kernel delays; without it the relay does (bandwidth stays tbf's).
        delay = None if self.netem else replace(link, rate_mbit=0.0, loss_pct=0.0)
        self._relays.append(_Relay(host_ip, BROKER_PORT, delay, self.device_core))

    def _shape(self, prefix: tuple[str, ...], dev: str, link: Link) -> None:
        # The bandwidth: a token bucket (burst: 10 ms at the rate, at least a few MTUs),
        # under netem's delay, jitter and loss where the kernel has netem.
        burst = max(4 * 1514, int(link.rate_mbit * 1e6 / 8 * 0.01))
        tbf = ["tbf", "rate", f"{link.rate_mbit}mbit", "burst", str(burst), "latency", "200ms"]
        if not self.netem:
            _run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", *tbf)
            return
        netem = ["delay", f"{link.delay_ms}ms"]
        if link.jitter_ms:
            netem += [f"{link.jitter_ms}ms", "distribution", "normal"]
        if link.loss_pct:
            netem += ["loss", f"{link.loss_pct}%"]
        _run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", *netem)
        _run(*prefix, "tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *tbf)

    def down_links(self) -> None:
        for relay in self._relays:
            relay.stop()
        self._relays.clear()
        for ns in self._made_ns:
            # Deleting the namespace deletes its veth end, and with it the host's end.
            _run("ip", "netns", "del", ns, check=False)
        self._made_ns.clear()

    # --- compute budgets -----------------------------------------------------------------

    def budget_dir(self, i: int, profile: Profile) -> Path | None:
        """A cgroup giving ``1 / profile.slowdown`` of a core, for device ``i`` to join."""
        if self.cgroup is None:
            return None
        version, root = self.cgroup
        path = root / f"{self.tag}-{profile.name}-d{i}"
        if not path.exists():
            path.mkdir()
            self._made_cg.append(path)
        # CFS needs a quota of at least 1 ms: the period grows with the slowdown, so a
        # throttled device still gets a slice every few milliseconds (duty cycling).
        period = max(10_000, int(1000 * profile.slowdown))
        quota = int(period / profile.slowdown)
        if version == "v1":
            (path / "cpu.cfs_period_us").write_text(str(period))
            (path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (path / "cpu.max").write_text(f"{quota} {period}")
        self._favour(path)
        return path

    def release(self, pid: int) -> None:
        """Move process ``pid`` back to the root cgroup (no budget: set-up at full speed)."""
        if self.cgroup is not None:
            (self.cgroup[1] / "cgroup.procs").write_text(str(pid))

    def edge_dir(self) -> Path | None:
        """A cgroup for the edge: no quota, favoured like the devices (see ``_favour``)."""
        if self.cgroup is None:
            return None
        path = self.cgroup[1] / f"{self.tag}-edge"
        if not path.exists():
            path.mkdir()
            self._made_cg.append(path)
        self._favour(path)
        return path

    def _favour(self, path: Path) -> None:
        # On a shared machine other people's processes compete for the same cores: a
        # large weight lets the devices get their whole quota and the edge its core while
        # they compute (the quota still caps each device), so "1/N of a core" holds.
        if self.cgroup is not None and self.cgroup[0] == "v1":
            (path / "cpu.shares").write_text(str(SHARES_V1))
        else:
            (path / "cpu.weight").write_text(str(SHARES_V1 * 100 // 1024))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.down_links()
        for path in self._made_cg:
            for _ in range(50):  # a device process may still be leaving it
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        self._made_cg.clear()
        if signal.getsignal(signal.SIGTERM) == self._on_term:
            signal.signal(signal.SIGTERM, self._old_term)


def join_budget(path: Path | None, pid: int) -> None:
    """Move process ``pid`` (all its threads) into the cgroup ``path``. The parent does
    it: ``ip netns exec`` remounts /sys, so a device cannot see the cgroup tree itself."""
    if path is not None:
        (path / "cgroup.procs").write_text(str(pid))


# --- the user-space shaping relay (the fallback) ------------------------------------------


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float, delay: float,
    jitter: float,
) -> None:  # fmt: skip
    """Copy with each chunk delivered ``delay`` (+ jitter) after it was read, and the
    bytes paced at ``rate`` bytes/s, in order (a FIFO link)."""
    loop = asyncio.get_running_loop()
    free_at = 0.0  # when the link finishes sending what it has queued
    last_due = 0.0
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                writer.close()
                return
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    task = asyncio.create_task(deliver())
    while True:
        data = await reader.read(65536)
        now = loop.time()
        free_at = max(free_at, now) + len(data) / rate
        due = max(last_due, free_at + delay + random.gauss(0.0, jitter))
        last_due = due
        await queue.put((due, data))
        if not data:
            break
    await task


def _serve_relay(host: str, port: int, shaping: list[str]) -> None:
    rate_mbit, delay_ms, jitter_ms = (float(v) for v in shaping) if shaping else (0, 0, 0)
    rate = rate_mbit * 1e6 / 8 if rate_mbit else float("inf")

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        br, bw = await asyncio.open_connection("127.0.0.1", BROKER_PORT)
        d, j = delay_ms / 1000, jitter_ms / 1000
        await asyncio.gather(_pipe(cr, bw, rate, d, j), _pipe(br, cw, rate, d, j))

    async def main() -> None:
        server = await asyncio.start_server(handle, host, port, reuse_address=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "relay":
    _serve_relay(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
