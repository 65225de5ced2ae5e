"""Child processes that store updates for one `fedmq orchestrator` (``ingest_processes``).

An orchestrator process is one Python interpreter: its consumers, counter and outbox share
one core's worth of GIL. Storing an update (parse, verify, decode, write the blob and the
inbox row) needs no run lock and no machine, so it can run in other processes: each child
is `fedmq orchestrator --ingest-only`, consuming ``fedmq.updates`` beside (or instead of)
the parent's own ingest threads. The inbox rows a child writes wake the counting replica
through LISTEN/NOTIFY, as those of another replica do; the refusals it queues go out with
the parent's next outbox drain.

The parent restarts a child that exits (after a delay that doubles up to a minute) and
stops them all, SIGTERM then SIGKILL, when it stops. A child killed mid-batch loses
nothing: its un-acked updates are redelivered.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# A child's restart delay starts here and doubles per quick exit, up to the cap.
RESTART_S = 1.0
RESTART_MAX_S = 60.0
# A child that ran this long before exiting is restarted at the first delay again.
HEALTHY_S = 60.0
STOP_GRACE_S = 10.0


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    delay: float = RESTART_S
    restart_at: float | None = None


@dataclass
class IngestProcesses:
    """``count`` children running ``argv`` (default: this interpreter's `fedmq orchestrator
    --ingest-only --no-upgrade`), supervised by a thread of this process."""

    count: int
    argv: list[str] = field(
        default_factory=lambda: [
            sys.executable,
            "-m",
            "fedmq.cli",
            "orchestrator",
            "--ingest-only",
            "--no-upgrade",
        ]
    )
    env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self._children = [_Child(i) for i in range(self.count)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> IngestProcesses:
        for child in self._children:
            self._spawn(child)
        self._thread = threading.Thread(target=self._watch, name="ingest-processes", daemon=True)
        self._thread.start()
        return self

    def _spawn(self, child: _Child) -> None:
        env = {**os.environ, **(self.env or {}), "FEDMQ_INGEST_PROCESSES": "0"}
        child.proc = subprocess.Popen(self.argv, env=env)
        child.started = time.monotonic()
        log.info("ingest process %d started (pid %d)", child.index, child.proc.pid)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for child in self._children:
                if child.restart_at is not None:
                    if now >= child.restart_at and not self._stop.is_set():
                        child.restart_at = None
                        self._spawn(child)
                    continue
                if child.proc is None or child.proc.poll() is None:
                    continue
                if now - child.started >= HEALTHY_S:
                    child.delay = RESTART_S
                log.warning(
                    "ingest process %d (pid %d) exited with %s; restarting in %.0f s",
                    child.index,
                    child.proc.pid,
                    child.proc.returncode,
                    child.delay,
                )
                child.restart_at = now + child.delay
                child.delay = min(child.delay * 2, RESTART_MAX_S)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        live = [c.proc for c in self._children if c.proc is not None and c.proc.poll() is None]
        for p in live:
            p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
