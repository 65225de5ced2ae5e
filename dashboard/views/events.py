"""Events: the live event log, filterable by client, round and kind; refused (dead-lettered)
messages with their reasons."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard import format as fmt
from db.engine import session_scope
from db.models import Event
from db.queries import dashboard as dq

cfg = data.config()
st.title("Events")
run_id = data.required_run()

with session_scope(data.sessions()) as s:
    kinds = dq.event_kinds(s, run_id)
c = st.columns([2, 1, 2, 1])
client = data.client_picker(c[0], "events_client", everyone=True)
number = int(c[1].number_input("Round (0: all)", 0, None, 0, key="events_round"))
chosen = c[2].multiselect("Kinds", kinds, key="events_kinds")
limit = int(c[3].selectbox("Show", [50, 100, 500], key="events_limit"))


def _short(value: Any) -> str:
    """A detail value as a table cell: a round.opened of 1,000 devices lists them all, and
    500 such rows made a page of megabytes."""
    if isinstance(value, list) and len(value) > 5:
        return f"[{len(value)} items]"
    text = str(value)
    return text if len(text) <= 120 else text[:119] + "…"


def _frame(events: list[Event], names: dict[str, str], reason_only: bool = False) -> pd.DataFrame:
    def detail(e: Event) -> str:
        if reason_only or "reason" in e.detail:
            return str(e.detail.get("reason", ""))
        return ", ".join(f"{k}={_short(v)}" for k, v in list(e.detail.items())[:6])

    rows: list[dict[str, Any]] = [
        {
            "id": e.id,
            "time": fmt.stamp(e.ts),
            "kind": e.kind,
            "client": names.get(e.client_id or "", e.client_id),
            "round": e.round,
            "reason" if reason_only else "detail": detail(e),
        }
        for e in events
    ]
    return pd.DataFrame(rows)


@st.fragment(run_every=cfg.refresh_s)
def log() -> None:
    with session_scope(data.sessions()) as s:
        total = dq.count_events(s, run_id)
        events = dq.list_events_filtered(
            s, run_id, client_id=client, round=number or None, kinds=chosen, limit=limit
        )
        refused = dq.list_refusals(s, run_id, limit=limit)
        # The names of the clients shown only, not of the whole fleet.
        names = dq.client_names(s, run_id, {e.client_id for e in events + refused if e.client_id})
    st.subheader("Log")
    st.caption(f"{len(events)} newest of {total} events in this run")
    st.dataframe(_frame(events, names), hide_index=True, width="stretch")
    st.subheader("Refused and dead-lettered")
    st.caption(
        "Messages the orchestrator refused (dead-lettered on the bus with the reason) and "
        "refused commands."
    )
    if refused:
        st.dataframe(_frame(refused, names, reason_only=True), hide_index=True, width="stretch")
    else:
        st.success("Nothing refused.")


log()
