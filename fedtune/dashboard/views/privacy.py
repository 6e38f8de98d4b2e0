"""Privacy budget: per node and data set, epsilon spent over rounds against its cap, the
remaining budget, delta and accountant; the rounds nodes declined for lack of budget; and
whether each node's ledger copy verifies against the node's key stored in the database."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from fedtune.dashboard import charts, common, queries
from fedtune.dashboard.database import read_schema
from fedtune.dashboard.ledger_checks import check_copy
from fedtune.dashboard.summaries import budget_declines, budget_series, budget_summary

VERDICT_ICONS = {
    "verifies": "✅ verifies",
    "fails": "❌ fails",
    "incomplete": "⚠️ incomplete",
    "unverifiable": "⚠️ cannot verify",
    "empty": "— no entries",
}


def budget_section() -> None:
    everything = common.fetch(queries.epsilon_reports)
    if everything.empty:
        common.note_absent(
            "No epsilon reports yet.",
            why="Each node reports the epsilon its data set has spent after every round it trains.",
        )
        return
    st.subheader("Budget now")
    st.caption(
        "Epsilon accumulates over a node's whole life on a data set (every run), so these "
        "figures count all runs."
    )
    summary = budget_summary(everything)
    columns = st.columns(min(len(summary), 4))
    for index, (_, row) in enumerate(summary.iterrows()):
        column = columns[index % len(columns)]
        epsilon = common.number(row["epsilon"])
        if pd.isna(row["epsilon_cap"]):
            column.metric(
                row["series"], f"ε {epsilon}", "no cap recorded", delta_color="off", border=True
            )
        else:
            column.metric(
                row["series"],
                f"ε {epsilon} of {row['epsilon_cap']:g}",
                f"{common.number(row['remaining'])} left",
                delta_arrow="off",
                border=True,
                help=f"delta {common.number(row['delta'], 'g')}, "
                f"accountant {row['accountant'] or '—'}",
            )
        if row["non_private_rounds"]:
            column.warning(
                f"{row['non_private_rounds']} round(s) trained without DP: no privacy "
                "guarantee for this data set."
            )
    st.dataframe(
        pd.DataFrame(
            {
                "node": summary["node_name"],
                "data set": summary["data_fingerprint"],
                "epsilon": summary["epsilon"],
                "cap": summary["epsilon_cap"],
                "remaining": summary["remaining"],
                "used": summary["share_used"],
                "delta": summary["delta"],
                "accountant": summary["accountant"],
                "rounds": summary["rounds"],
                "non-private rounds": summary["non_private_rounds"],
            }
        ),
        hide_index=True,
        column_config={
            "epsilon": st.column_config.NumberColumn(format="%.3f"),
            "remaining": st.column_config.NumberColumn(format="%.3f"),
            "used": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1),
            "delta": st.column_config.NumberColumn(format="%.0e"),
        },
    )
    if summary["epsilon_cap"].isna().all():
        common.note_absent("No epsilon cap is recorded for any data set, so none is drawn.")
    elif not common.fetch(read_schema).has("epsilon_reports", "epsilon_cap"):
        st.caption(
            "This database's epsilon reports predate caps: the caps shown are those the "
            "nodes' signed ledger entries record."
        )


def chart_section() -> None:
    st.subheader("Epsilon over rounds")
    runs = common.fetch(queries.runs)
    run = common.pick_run(runs, key="privacy-run", allow_all=True)
    reports = common.fetch(queries.epsilon_reports, run)
    if reports.empty:
        common.note_absent("No epsilon reports for this run.")
        return
    series = budget_series(common.fetch(queries.epsilon_reports))
    if run is not None:
        series = series[series["run_id"] == run]
        x, title = "round", "round"
    else:
        x, title = "step", "rounds trained on the data set (all runs, in order)"
    st.altair_chart(charts.epsilon_chart(series, x=x, x_title=title), width="stretch")
    st.caption("Solid: epsilon spent after each round. Dashed, same colour: the data set's cap.")


def declines_section() -> None:
    st.subheader("Rounds declined for lack of budget")
    declines = budget_declines(common.fetch(queries.rejected_updates))
    if declines.empty:
        st.caption("No node has declined a round for lack of privacy budget.")
        return
    st.dataframe(
        pd.DataFrame(
            {
                "run": declines["run_id"],
                "round": declines["round"],
                "node": declines["node_name"],
                "reason": declines["reason"],
                "when (UTC)": declines["created_at"],
            }
        ),
        hide_index=True,
    )


def ledger_section() -> None:
    st.subheader("Ledger copies")
    nodes = common.fetch(queries.ledger_copy_nodes)
    if nodes is None:
        common.note_absent(
            "This database has no ledger tables: it predates the epsilon ledger, so there is "
            "nothing to verify."
        )
        return
    if not nodes:
        common.note_absent("No ledger copies yet: nodes send a signed entry with every round.")
        return
    checks = [common.fetch(check_copy, node) for node in nodes]
    st.dataframe(
        pd.DataFrame(
            {
                "node": [c.node for c in checks],
                "entries": [c.entries for c in checks],
                "verdict": [VERDICT_ICONS[c.verdict] for c in checks],
                "detail": [c.message for c in checks],
            }
        ),
        hide_index=True,
    )
    for check in checks:
        if check.verdict == "fails":
            st.error(f"The ledger copy of {check.node} does not verify: {check.message}")
    st.caption(
        "Checked against each node's public key stored in this database: chain, signatures "
        "and the signed head. An auditor verifies the exported file offline (Audit page)."
    )


st.title("Privacy budget")
budget_section()
if not common.fetch(queries.runs).empty:
    chart_section()
declines_section()
ledger_section()
