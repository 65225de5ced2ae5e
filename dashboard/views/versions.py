"""Versions: an async (FedBuff) run speaks versions, not rounds. Versions per minute, the
staleness of the folded updates, each device's contribution, and accuracy per version and
per wall-clock second."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import streamlit as st

from dashboard import data
from db.engine import session_scope
from db.queries import dashboard as dq

cfg = data.config()
st.title("Versions")
run_id = data.required_run()


@st.fragment(run_every=cfg.refresh_s)
def versions() -> None:
    with session_scope(data.sessions()) as s:
        if not dq.is_async_run(s, run_id):
            st.info("This run is synchronous: its rounds are on the Rounds page.")
            return
        steps = dq.version_steps(s, run_id)
        names = dq.client_names(s, run_id, sorted({c for v in steps for c in v.clients}))
    if not steps:
        st.info("No version yet.")
        return
    span_min = (steps[-1].created_at - steps[0].created_at).total_seconds() / 60.0
    # Versions after the first over the time between the first and the last.
    per_minute = (len(steps) - 1) / span_min if span_min > 0 else None
    staleness = [x for v in steps for x in v.staleness]
    cols = st.columns(4)
    cols[0].metric("Versions", len(steps))
    cols[1].metric("Versions per minute", "—" if per_minute is None else f"{per_minute:.2f}")
    cols[2].metric("Updates folded", len(staleness))
    mean = sum(staleness) / len(staleness) if staleness else None
    cols[3].metric("Mean staleness", "—" if mean is None else f"{mean:.2f}")

    frame = pd.DataFrame(
        [
            {
                "version": v.version,
                "round": v.round,
                "seconds": round(v.seconds, 2),
                "accuracy": v.accuracy,
                "loss": v.loss,
                "updates": len(v.clients),
                "max staleness": max(v.staleness) if v.staleness else None,
                "staleness": ", ".join(str(x) for x in v.staleness),
            }
            for v in steps
        ]
    )
    done = frame[frame["accuracy"].notna()]
    left, right = st.columns(2)
    left.markdown("**Accuracy per version**")
    left.line_chart(done, x="version", y="accuracy")
    right.markdown("**Accuracy per wall-clock second** (since the run was created)")
    right.line_chart(done, x="seconds", y="accuracy")

    hist = Counter(staleness)
    hist_frame = pd.DataFrame(
        [{"staleness": k, "updates": hist[k]} for k in range(max(hist, default=-1) + 1)]
    )
    counts = Counter(c for v in steps for c in v.clients)
    contribution = pd.DataFrame(
        [
            {"client": names.get(cid, cid), "id": cid, "updates folded": n}
            for cid, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
    )
    left, right = st.columns(2)
    left.markdown("**Staleness of the folded updates** (versions behind)")
    left.bar_chart(hist_frame, x="staleness", y="updates")
    right.markdown("**Contribution per device** (updates folded)")
    right.bar_chart(contribution, x="client", y="updates folded")
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        column_config={
            "accuracy": st.column_config.NumberColumn(format="%.4f"),
            "loss": st.column_config.NumberColumn(format="%.4f"),
        },
    )
    st.dataframe(contribution, hide_index=True, width="stretch")


versions()
