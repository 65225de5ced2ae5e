"""Connections shared by every session of the app (``st.cache_resource``), and the run
selector that every page reads."""

from __future__ import annotations

from typing import Any

import streamlit as st
from sqlalchemy import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dashboard.config import DashboardConfig, from_env
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.queries import dashboard as dq
from protocol.bus import Bus, connect

RUN_KEY = "run_id"
# Clients a picker lists at most: a select box of 100,000 options took seconds to send and
# draw, so a larger fleet is searched instead.
PICKER_LIMIT = 100


def config() -> DashboardConfig:
    return from_env()


@st.cache_resource
def _sessions(url: str) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(url))


def sessions() -> sessionmaker[Session]:
    return _sessions(config().database_url)


@st.cache_resource
def _bus(url: str) -> Bus:
    return connect(url)


def bus() -> Bus:
    return _bus(config().broker_url)


def runs() -> dict[str, str]:
    """Run id -> label, newest first. Stops the page with a hint if the database cannot be
    read (down, or never migrated), instead of a traceback."""
    try:
        with session_scope(sessions()) as s:
            found = q.list_runs(s)
    except SQLAlchemyError as e:
        st.error(
            f"Cannot read the database at {_safe(config().database_url)}: "
            f"{type(e).__name__}. Is it up, and migrated (`fedmq db upgrade`)?"
        )
        st.stop()
    return {r.id: f"{r.name} ({r.id[:8]})" for r in reversed(found)}


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def select_run() -> str | None:
    """The sidebar's run selector; the choice is kept across pages (and in ?run=...)."""
    choices = runs()
    if not choices:
        st.sidebar.info("No run yet: create one with `fedmq run create` or `fedmq simulate`.")
        return None
    wanted = st.session_state.get(RUN_KEY) or st.query_params.get("run")
    if wanted not in choices:
        wanted = next(iter(choices))
    st.session_state[RUN_KEY] = wanted
    chosen = st.sidebar.selectbox(
        "Run", list(choices), format_func=choices.__getitem__, key=RUN_KEY
    )
    st.query_params["run"] = chosen
    return str(chosen)


def current_run() -> str | None:
    return st.session_state.get(RUN_KEY)


def required_run() -> str:
    """The chosen run; a page stops here when there is none (the sidebar says why)."""
    run_id = current_run()
    if run_id is None:
        st.stop()
    return run_id


def client_picker(where: Any, key: str, *, everyone: bool = False) -> str | None:
    """A select box of the current run's clients (``key``) in ``where`` (a column), small
    however large the fleet: all of them up to ``PICKER_LIMIT``; beyond that a search box
    above it (part of a name, or the start of an id) and the first matches, the client
    already chosen always among them. ``everyone``: a first choice None, shown as "all"."""
    run_id = current_run()
    if run_id is None:
        return None
    chosen = st.session_state.get(key)
    with session_scope(sessions()) as s:
        total = dq.count_clients(s, run_id)
        text = ""
        if total > PICKER_LIMIT:
            text = where.text_input("Find a client (name or id)", key=f"{key}_find")
        names = dq.find_clients(s, run_id, text, PICKER_LIMIT)
        if chosen is not None and chosen not in names:
            names = {**dq.client_names(s, run_id, [chosen]), **names}
    if total > PICKER_LIMIT:
        where.caption(f"{len(names)} of {total} clients listed; type to find others")
    options: list[str | None] = [None, *names] if everyone else list(names)
    picked = where.selectbox(
        "Client",
        options,
        format_func=lambda cid: "all" if cid is None else f"{names[cid]} ({cid[:8]})",
        key=key,
    )
    return None if picked is None else str(picked)
