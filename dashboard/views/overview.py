"""Overview: the services' health, the global model status (paper 2's dashboard) and the
client table."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard import format as fmt
from db.engine import session_scope
from db.models import ClientState
from db.queries import dashboard as dq

cfg = data.config()
st.title("Overview")


@st.fragment(run_every=cfg.refresh_s)
def services() -> None:
    """Each long-running process's heartbeat row: a service that reconnects, restarts, gave
    up or went silent says so here (issue 17: nothing did)."""
    now = datetime.now(UTC)
    with session_scope(data.sessions()) as s:
        rows = dq.service_health(s, now)
    if not rows:
        return
    st.subheader("Services")
    for r in (r for r in rows if not r.healthy):
        since = "" if r.since is None else f" since {fmt.ago(r.since, now)}"
        tries = f", attempt {r.attempts}" if r.attempts and r.state != "silent" else ""
        why = f" ({r.last_error})" if r.last_error else ""
        st.warning(f"{r.name}: {fmt.badge(r.state)}{since}{tries}{why}")
    frame = pd.DataFrame(
        [
            {
                "service": r.name,
                "state": fmt.badge(r.state),
                "since": "—" if r.since is None else fmt.ago(r.since, now),
                "attempts": r.attempts,
                "reconnects / restarts": r.reconnects,
                "host": f"{r.host}:{r.pid}",
                "last heard": fmt.ago(r.seen_at, now),
            }
            for r in rows
        ]
    )
    st.dataframe(frame, hide_index=True, width="stretch")


services()
run_id = data.required_run()


@st.fragment(run_every=cfg.refresh_s)
def global_status() -> None:
    with session_scope(data.sessions()) as s:
        ov = dq.run_overview(s, run_id)
    if ov is None:
        st.warning(f"Run {run_id} is gone.")
        return
    st.subheader("Global model status")
    c = st.columns(6)
    c[0].metric("Autorun", fmt.autorun(ov.autorun_remaining))
    c[1].metric("Current round", ov.current_round)
    c[2].metric("Round state", ov.round_state or "—")
    c[3].metric("Clients", ov.clients)
    c[4].metric("Global accuracy", fmt.percent(ov.accuracy))
    c[5].metric("Last updated", fmt.ago(ov.last_updated))
    st.caption(
        f"run **{ov.name}** · status **{ov.status}** · {ov.rounds_done} rounds done · "
        f"model version {ov.model_version} · loss "
        f"{'—' if ov.loss is None else f'{ov.loss:.4f}'} · updated {fmt.stamp(ov.last_updated)}"
    )
    if ov.privacy is not None:
        dp = ov.privacy
        eps = "—" if dp["epsilon"] is None else f"{dp['epsilon']:.3f}"
        budget = "" if dp["epsilon_budget"] is None else f" of budget {dp['epsilon_budget']}"
        st.caption(
            f"differential privacy ({dp['mode']}) · ε = **{eps}**{budget} at δ = {dp['delta']}"
            + (f" · **{dp['budget_spent']}**" if dp["budget_spent"] else "")
        )
    if ov.edge_body is not None:  # a split run: devices hold head and tail, the edge the body
        body = ov.edge_body
        size = "" if body["bytes"] is None else f", {body['bytes'] / 2**20:.2f} MiB"
        st.caption(
            f"split run · global model = device head + tail (version {ov.model_version}) · "
            f"edge body from round {body['round']} (`{body['sha256'][:12]}`{size})"
        )
    st.markdown(
        " · ".join(
            f"{fmt.badge(state.value)} **{ov.clients_by_state.get(state.value, 0)}**"
            for state in ClientState
        )
    )


@st.fragment(run_every=cfg.refresh_s)
def client_table() -> None:
    st.subheader("Clients")
    left, right = st.columns([3, 1])
    states = left.multiselect(
        "State", [s.value for s in ClientState], format_func=fmt.badge, key="client_states"
    )
    with session_scope(data.sessions()) as s:
        total = dq.count_clients(s, run_id, states or None)
        pages = max(1, math.ceil(total / cfg.page_size))
        page = int(right.number_input("Page", 1, pages, 1, key="client_page"))
        found = dq.client_page(
            s,
            run_id,
            offset=(min(page, pages) - 1) * cfg.page_size,
            limit=cfg.page_size,
            states=states or None,
        )
    st.caption(f"{found.total} clients · page {min(page, pages)} of {pages}")
    frame = pd.DataFrame(
        [
            {
                "client": r.display_name,
                "id": r.id,
                "state": fmt.badge(r.state),
                "last seen": fmt.ago(r.last_seen),
                "rounds": r.rounds_participated,
                "samples": r.samples,
                "bytes sent": r.bytes_sent,
                "last loss": r.last_loss,
            }
            for r in found.rows
        ],
        columns=[
            "client",
            "id",
            "state",
            "last seen",
            "rounds",
            "samples",
            "bytes sent",
            "last loss",
        ],
    )
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        column_config={"last loss": st.column_config.NumberColumn(format="%.4f")},
    )


global_status()
client_table()
