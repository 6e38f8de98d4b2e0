"""Audit: a node's ledger entries as the coordinator holds them, filtered by run, data set
and date; a button that verifies the copy; and the files an auditor takes away (the ledger
JSONL for `fedtune audit verify` and the HTML report)."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import streamlit as st

from fedtune.dashboard import common, queries
from fedtune.dashboard.database import DashboardError
from fedtune.dashboard.ledger_checks import AuditFiles, audit_files, check_copy
from fedtune.dashboard.summaries import short_fingerprint

FILES_KEY = "audit-files"
ENTRY_COLUMNS = [
    "seq",
    "run_id",
    "round",
    "data_fingerprint",
    "mode",
    "steps",
    "sample_rate",
    "noise_multiplier",
    "max_grad_norm",
    "epsilon_round",
    "epsilon_after",
    "epsilon_cap",
    "delta",
    "accountant",
    "recorded_at",
    "hash",
]


def filtered(entries: pd.DataFrame) -> pd.DataFrame:
    """``entries`` narrowed by the run, data set and date filters shown here."""
    left, middle, right = st.columns(3)
    runs = left.multiselect("Runs", sorted(entries["run_id"].dropna().unique()), key="audit-runs")
    data_sets = middle.multiselect(
        "Data sets",
        sorted(entries["data_fingerprint"].dropna().unique()),
        format_func=short_fingerprint,
        key="audit-data-sets",
    )
    times = entries["recorded_at"].dropna()
    chosen = entries
    if runs:
        chosen = chosen[chosen["run_id"].isin(runs)]
    if data_sets:
        chosen = chosen[chosen["data_fingerprint"].isin(data_sets)]
    if not times.empty:
        first, last = times.min().date(), times.max().date()
        dates = right.date_input(
            "Recorded between (UTC)",
            value=(first, last),
            min_value=first,
            max_value=last,
            key="audit-dates",
        )
        if isinstance(dates, tuple) and len(dates) == 2:
            start, end = dates
            if isinstance(start, dt.date) and isinstance(end, dt.date):
                day = chosen["recorded_at"].dt.date
                chosen = chosen[(day >= start) & (day <= end)]
    return chosen


def entries_section(node: str) -> None:
    entries = common.fetch(queries.ledger_rows, node)
    if entries.empty:
        common.note_absent(f"No ledger entries of {node} have reached the coordinator yet.")
        return
    shown = filtered(entries)
    st.dataframe(
        shown[[c for c in ENTRY_COLUMNS if c in shown.columns]],
        hide_index=True,
        column_config={"delta": st.column_config.NumberColumn(format="%.0e")},
    )
    st.caption(f"{len(shown)} of {len(entries)} entries shown.")


def verify_section(node: str) -> None:
    if not st.button("Verify this ledger copy", key="audit-verify", icon=":material/verified:"):
        return
    check = check_copy(common.engine(common.require_database()), node)
    if check.verdict == "verifies":
        st.success(f"{node}'s ledger copy verifies: {check.message}.")
    elif check.verdict == "fails":
        st.error(f"{node}'s ledger copy does not verify: {check.message}")
    else:
        st.warning(f"{node}'s ledger copy: {check.message}.")


def downloads_section(node: str) -> None:
    st.subheader("For the auditor")
    st.caption(
        "The whole ledger copy (the filters above do not apply: an auditor verifies the complete "
        "chain), exported and verified against the node's key stored here, with every epsilon "
        "recomputed independently. Verify the file offline with `fedtune audit verify`."
    )
    if st.button("Prepare audit files", key="audit-prepare", icon=":material/download:"):
        try:
            st.session_state[FILES_KEY] = audit_files(
                common.engine(common.require_database()), node
            )
        except DashboardError as error:
            st.session_state.pop(FILES_KEY, None)
            st.error(str(error))
    files = st.session_state.get(FILES_KEY)
    if not isinstance(files, AuditFiles) or files.node != node:
        return
    (st.success if files.ok else st.error)(
        f"{files.entries} entries: "
        + ("verified, every epsilon recomputed." if files.ok else "the audit found problems.")
    )
    st.code(files.summary, language=None)
    left, right = st.columns(2)
    left.download_button(
        "Ledger (JSONL)",
        data=files.jsonl,
        file_name=files.jsonl_name,
        mime="application/jsonl",
        on_click="ignore",
        key="audit-jsonl",
    )
    right.download_button(
        "Audit report (HTML)",
        data=files.html,
        file_name=files.html_name,
        mime="text/html",
        on_click="ignore",
        key="audit-html",
    )


st.title("Audit")
nodes = common.fetch(queries.ledger_copy_nodes)
if nodes is None:
    common.note_absent(
        "This database has no ledger tables: it predates the epsilon ledger.",
        why="Export a node's own ledger with "
        "`fedtune audit export --db STATE_DIR/ledger.db --node NAME --out FILE`.",
    )
    st.stop()
if not nodes:
    common.note_absent("No ledger copies yet: nodes send a signed entry with every round.")
    st.stop()
chosen = st.selectbox("Node", nodes, key="audit-node")
assert chosen is not None
entries_section(chosen)
verify_section(chosen)
downloads_section(chosen)
