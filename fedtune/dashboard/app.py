"""The Streamlit entry point: ``streamlit run app.py -- --db URL``.

It checks the database, shows which one it reads (read-only), and routes to the pages in
``views/``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from fedtune.dashboard import common
from fedtune.dashboard.database import describe_database

VIEWS = Path(__file__).parent / "views"

st.set_page_config(page_title="fedtune coordinator", page_icon=":material/hub:", layout="wide")

url = common.require_database()
with st.sidebar:
    st.caption(f"Database (read-only): `{describe_database(url)}`")
    st.caption(f"Figures are re-read every {common.CACHE_SECONDS} s; press R to refresh.")

pages = [
    st.Page(VIEWS / "overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page(VIEWS / "privacy.py", title="Privacy budget", icon=":material/shield:"),
    st.Page(VIEWS / "ab_tests.py", title="A/B tests", icon=":material/compare_arrows:"),
    st.Page(VIEWS / "health.py", title="Model health", icon=":material/monitor_heart:"),
    st.Page(VIEWS / "costs.py", title="Protections and costs", icon=":material/paid:"),
    st.Page(VIEWS / "audit.py", title="Audit", icon=":material/fact_check:"),
]
st.navigation(pages).run()
