"""The fedmq dashboard: ``fedmq dashboard`` runs ``streamlit run`` on this file.

One entry file: the sidebar's run selector, then the page chosen in the navigation.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import data

HERE = Path(__file__).parent

st.set_page_config(page_title="fedmq", page_icon="🛰️", layout="wide")
st.sidebar.title("fedmq")
data.select_run()
page = st.navigation(
    [
        st.Page(HERE / "views" / "overview.py", title="Overview", icon="📊", default=True),
        st.Page(HERE / "views" / "rounds.py", title="Rounds", icon="📈"),
        st.Page(HERE / "views" / "versions.py", title="Versions", icon="⏩"),
        st.Page(HERE / "views" / "events.py", title="Events", icon="📜"),
        st.Page(HERE / "views" / "controls.py", title="Controls", icon="🎛️"),
    ]
)
page.run()
