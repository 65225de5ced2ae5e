"""Rounds: accuracy and loss per round (several runs side by side), duration, bytes up and
down, participants, stragglers and dropouts."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import data
from db.engine import session_scope
from db.queries import dashboard as dq

cfg = data.config()
st.title("Rounds")
run_id = data.required_run()
labels = data.runs()
compare = st.multiselect(
    "Runs to compare",
    list(labels),
    default=[run_id],
    format_func=labels.__getitem__,
    key=f"compare_runs_{run_id}",
)


@st.fragment(run_every=cfg.refresh_s)
def rounds() -> None:
    chosen = compare or [run_id]
    with session_scope(data.sessions()) as s:
        stats = dq.round_stats(s, chosen)
    if not stats:
        st.info("No round yet.")
        return
    frame = pd.DataFrame(
        [
            {
                "run": labels.get(r.run_id, r.run_id),
                "round": r.number,
                "state": r.state,
                "attempt": r.attempt,
                "accuracy": r.accuracy,
                "loss": r.loss,
                "duration s": r.duration_s,
                "selected": r.selected,
                "updates": r.updates,
                "stragglers": r.missing + r.late,
                "dropouts": r.dropped,
                "bytes up": r.bytes_up,
                "bytes down": r.bytes_down,
                "ε": r.epsilon,
            }
            for r in stats
        ]
    )
    done = frame[frame["accuracy"].notna()]
    left, right = st.columns(2)
    left.markdown("**Accuracy per round**")
    left.line_chart(done, x="round", y="accuracy", color="run")
    right.markdown("**Loss per round**")
    right.line_chart(done, x="round", y="loss", color="run")
    own = frame[frame["run"] == labels.get(run_id, run_id)]
    left, mid, right = st.columns(3)
    left.markdown("**Duration (s)**")
    left.bar_chart(own, x="round", y="duration s")
    mid.markdown("**Bytes up / down**")
    mid.bar_chart(own, x="round", y=["bytes up", "bytes down"])
    right.markdown("**Participants, stragglers, dropouts**")
    right.bar_chart(own, x="round", y=["updates", "stragglers", "dropouts"])
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        column_config={
            "accuracy": st.column_config.NumberColumn(format="%.4f"),
            "loss": st.column_config.NumberColumn(format="%.4f"),
            "duration s": st.column_config.NumberColumn(format="%.2f"),
            "ε": st.column_config.NumberColumn(format="%.3f"),
        },
    )
    if frame["ε"].notna().any():
        st.markdown("**Privacy spent: ε after each round**")
        st.line_chart(frame[frame["ε"].notna()], x="round", y="ε", color="run")


rounds()
