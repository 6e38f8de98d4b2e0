"""Overview: the runs, their state, rounds done, nodes taking part, the latest global
held-out loss, the model in production and the latest alerts."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from fedtune.dashboard import common, queries
from fedtune.dashboard.summaries import node_label

ALERTS_SHOWN = 50


def runs_section() -> None:
    runs = common.fetch(queries.runs)
    if runs.empty:
        common.note_absent(
            "No runs yet.", why="Start one with `fedtune coordinator start` or `fedtune demo`."
        )
        return
    counts = runs["status"].value_counts()
    for column, (label, value) in zip(
        st.columns(4),
        [
            ("Runs", len(runs)),
            ("Running", int(counts.get("running", 0))),
            ("Finished", int(counts.get("finished", 0))),
            ("Failed", int(counts.get("failed", 0))),
        ],
        strict=True,
    ):
        column.metric(label, value)
    table = pd.DataFrame(
        {
            "run": runs["run_id"],
            "name": runs["name"],
            "state": runs["status"],
            "rounds done": [
                f"{done} / {planned}"
                for done, planned in zip(runs["rounds_done"], runs["rounds_planned"], strict=True)
            ],
            "nodes": [len(nodes) for nodes in runs["nodes"]],
            "node names": [", ".join(nodes) or "—" for nodes in runs["nodes"]],
            "global held-out loss": runs["held_out_loss"],
            "base model": runs["base_model_spec"],
            "started (UTC)": runs["started_at"],
            "finished (UTC)": runs["finished_at"],
        }
    )
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            "global held-out loss": st.column_config.NumberColumn(format="%.4f"),
        },
    )
    for _, run in runs[runs["status"] == "failed"].iterrows():
        st.error(f"Run {run['run_id']} failed: {run['error'] or 'no reason recorded'}")


def promotion_section() -> None:
    promotion = common.fetch(queries.latest_promotion)
    if promotion is None:
        st.caption("No model version has been promoted to production yet.")
        return
    when = promotion["promoted_at"]
    st.markdown(
        f"**In production:** `{promotion['version']}`, promoted by {promotion['promoted_by']}"
        + (f" on {when:%Y-%m-%d %H:%M} UTC" if pd.notna(when) else "")
        + (f" — {promotion['note']}" if promotion["note"] else "")
    )


def alerts_section() -> None:
    st.subheader("Alerts")
    alerts = common.fetch(queries.health_alerts)
    if alerts.empty:
        st.success("No alerts.", icon=":material/check_circle:")
        return
    st.dataframe(
        pd.DataFrame(
            {
                "run": alerts["run_id"],
                "round": alerts["round"],
                "node": [node_label(n) for n in alerts["node_name"]],
                "kind": alerts["kind"],
                "reason": alerts["message"],
                "raised (UTC)": alerts["created_at"],
            }
        ).head(ALERTS_SHOWN),
        hide_index=True,
    )
    if len(alerts) > ALERTS_SHOWN:
        st.caption(f"The latest {ALERTS_SHOWN} of {len(alerts)} alerts; see Model health.")


st.title("Overview")
runs_section()
promotion_section()
alerts_section()
