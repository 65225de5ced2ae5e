"""How values look on the pages: state badges, sizes, times."""

from __future__ import annotations

from datetime import UTC, datetime

BADGES = {
    "join": "🔵 join",
    "ready": "🟢 ready",
    "training": "🟠 training",
    "update": "🟣 update",
    "finish": "✅ finish",
    "offline": "⚫ offline",
    # Services (service_health)
    "connected": "🟢 connected",
    "running": "🟢 running",
    "connecting": "🟠 connecting",
    "reconnecting": "🟠 reconnecting",
    "restarting": "🟠 restarting",
    "failed": "🔴 failed",
    "crash-loop": "🔴 crash loop",
    "silent": "🔴 silent",
    "stopped": "⚫ stopped",
    "exited": "⚫ exited",
}


def badge(state: str) -> str:
    return BADGES.get(state, state)


def size(n: int | float | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop always returns


def autorun(remaining: int | None) -> str:
    """Paper 2's autorun field: rounds still to open, or off (None: never set; 0: finished)."""
    return "off" if not remaining else f"{remaining} left"


def percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def ago(t: datetime, now: datetime | None = None) -> str:
    s = ((now or datetime.now(UTC)) - t).total_seconds()
    if s < 60:
        return f"{max(s, 0):.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def stamp(t: datetime | None) -> str:
    return "—" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
