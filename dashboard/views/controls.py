"""Controls: autorun N, stop, open/close a round, kick, pause/resume. Each command goes
over the bus to the orchestrator, and the page shows the orchestrator's answer
(``command.result``) and the run's state after it."""

from __future__ import annotations

import streamlit as st

from dashboard import commands, data
from dashboard import format as fmt
from db.engine import session_scope
from db.queries import dashboard as dq
from protocol.bus import BusError
from protocol.messages import CommandAction

cfg = data.config()
st.title("Controls")
run_id = data.required_run()
LOG_KEY = "command_log"


@st.fragment(run_every=cfg.refresh_s)
def status() -> None:
    with session_scope(data.sessions()) as s:
        ov = dq.run_overview(s, run_id)
    if ov is None:
        return
    c = st.columns(5)
    c[0].metric("Run status", ov.status)
    c[1].metric("Autorun", fmt.autorun(ov.autorun_remaining))
    c[2].metric("Current round", ov.current_round)
    c[3].metric("Round state", ov.round_state or "—")
    c[4].metric("Rounds done", ov.rounds_done)


def _send(
    action: CommandAction, *, rounds: int | None = None, target_client: str | None = None
) -> None:
    """Send one command and wait (briefly) for the orchestrator to say what it did."""
    label = action.value + (f" {rounds}" if rounds is not None else "")
    if not cfg.can_send:
        _log("error", f"{label}: no broker to send it on (FEDMQ_BROKER_URL is memory://)")
        return
    if not cfg.operator_token:
        _log("error", f"{label}: no operator token (FEDMQ_OPERATOR_TOKEN) to sign it with")
        return
    try:
        message_id = commands.send(
            data.bus(),
            cfg.operator_token,
            run_id,
            action,
            rounds=rounds,
            target_client=target_client,
        )
    except BusError as e:
        _log("error", f"{label}: could not send it: {e}")
        return
    out = commands.wait_outcome(data.sessions(), action, message_id, cfg.command_timeout_s)
    with session_scope(data.sessions()) as s:
        ov = dq.run_overview(s, run_id)
    after = (
        ""
        if ov is None
        else f" Now: status {ov.status}, autorun "
        f"{fmt.autorun(ov.autorun_remaining)}, "
        f"round {ov.current_round} ({ov.round_state or '—'})."
    )
    if out.accepted is None:
        entry = (
            "warning",
            f"{label}: no answer from the orchestrator within "
            f"{cfg.command_timeout_s:.0f} s (is it running?)",
        )
    elif out.accepted:
        entry = ("success", f"{label}: accepted by the orchestrator.{after}")
    else:
        entry = ("error", f"{label}: refused by the orchestrator: {out.reason}.{after}")
    _log(*entry)


def _log(kind: str, text: str) -> None:
    """Newest first; the last five answers stay on the page."""
    st.session_state[LOG_KEY] = [(kind, text), *st.session_state.get(LOG_KEY, [])][:5]


status()
st.caption(f"Commands act on run **{data.runs().get(run_id, run_id)}** (choose it in the sidebar).")
if not cfg.can_send:
    st.warning("Embedded mode: the dashboard cannot reach another process's in-process bus.")

left, right = st.columns(2)
with left:
    st.markdown("**Autorun**")
    n = int(st.number_input("Rounds", 1, 100_000, 3, key="autorun_rounds"))
    a, b = st.columns(2)
    if a.button(f"Autorun {n}", key="autorun", type="primary"):
        _send(CommandAction.AUTORUN, rounds=n)
    if b.button("Stop autorun", key="stop_autorun"):
        _send(CommandAction.STOP_AUTORUN)
    st.markdown("**Round**")
    a, b = st.columns(2)
    if a.button("Open a round", key="open_round"):
        _send(CommandAction.OPEN_ROUND)
    if b.button("Close the open round", key="close_round"):
        _send(CommandAction.CLOSE_ROUND)
with right:
    st.markdown("**Run**")
    a, b = st.columns(2)
    if a.button("Pause", key="pause"):
        _send(CommandAction.PAUSE)
    if b.button("Resume", key="resume"):
        _send(CommandAction.RESUME)
    st.markdown("**Kick a client**")
    target = data.client_picker(st, "kick_client")
    if st.button("Kick", key="kick", disabled=target is None):
        _send(CommandAction.KICK, target_client=target)

st.subheader("Orchestrator answers")
for kind, text in st.session_state.get(LOG_KEY, []):
    getattr(st, kind)(text)
if not st.session_state.get(LOG_KEY):
    st.caption("No command sent in this session yet.")
