"""Protections and costs of one run: what protected it (as recorded when it started, and what
its own records show), and per node and round the tokens read and the device and wall time
the nodes reported, with a chart of the device time."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from fedtune.dashboard import charts, common, queries
from fedtune.dashboard.summaries import (
    cost_chart_frame,
    costs_per_node_round,
    protection_rows,
    release_seen,
)


def protections_section(run: str) -> None:
    st.subheader("Protections")
    stored = common.fetch(queries.stored_protections, run)
    rows = protection_rows(
        stored,
        records=common.fetch(queries.epsilon_reports, run),
        node_level=common.fetch(queries.node_level_entries, run),
        evidence=common.fetch(queries.run_ledger_evidence, run),
        release=release_seen(
            common.fetch(queries.node_metrics, run), common.fetch(queries.rejected_updates, run)
        ),
    )
    if stored is None:
        common.note_absent(
            "This run did not record its protections when it started.",
            why="Runs started before fedtune recorded them show only what their records hold.",
        )
    else:
        st.caption(
            f"A {stored.get('mode', 'run')}, as recorded when it started (today's configuration "
            "is not read), beside what the run's signed ledgers, receipts and replies show."
        )
    st.table(rows.set_index("protection"))  # a static table: long details wrap


def costs_section(run: str) -> None:
    st.subheader("Cost per node and round")
    per = costs_per_node_round(common.fetch(queries.node_costs, run))
    if per.empty:
        common.note_absent(
            "No cost figures for this run.",
            why="Nodes report them with each train and evaluate reply (runs recorded before "
            "migration 0006 have none) under "
            'privacy.release_metrics = "plain".',
        )
        return
    totals = [
        ("Tokens read", per["tokens"].sum(min_count=1), ",.0f"),
        ("Training device-seconds", per["train_device_seconds"].sum(min_count=1), ",.1f"),
        ("Evaluation device-seconds", per["evaluate_device_seconds"].sum(min_count=1), ",.1f"),
        ("Node wall seconds", per["wall_seconds"].sum(min_count=1), ",.1f"),
    ]
    for column, (label, value, spec) in zip(st.columns(4), totals, strict=True):
        column.metric(label, common.number(value, spec), border=True)
    st.dataframe(
        pd.DataFrame(
            {
                "round": per["round"],
                "node": per["node_name"],
                "tokens read": per["tokens"],
                "training tokens": per["train_tokens"],
                "evaluation tokens": per["evaluate_tokens"],
                "training device-s": per["train_device_seconds"],
                "evaluation device-s": per["evaluate_device_seconds"],
                "wall s": per["wall_seconds"],
                "refused by the coordinator": per["refused"].fillna(""),
            }
        ),
        hide_index=True,
        column_config={
            "tokens read": st.column_config.NumberColumn(format="localized"),
            "training tokens": st.column_config.NumberColumn(format="localized"),
            "evaluation tokens": st.column_config.NumberColumn(format="localized"),
            "training device-s": st.column_config.NumberColumn(format="%.2f"),
            "evaluation device-s": st.column_config.NumberColumn(format="%.2f"),
            "wall s": st.column_config.NumberColumn(format="%.2f"),
        },
    )
    st.caption(
        "Tokens: what the forward passes read, prompt and answer, padding excluded (training: "
        "every sampled example once per step it joined). Device-seconds: the training and "
        "evaluation loops on each node's device (CUDA synchronised before each clock read). "
        "Wall: each node's whole time on its train and evaluate messages. Empty: the node "
        "sent no such figure (its privacy.release_metrics is dp or none)."
    )
    refused = per[per["refused"].notna()]
    for row in refused.itertuples():
        st.warning(f"Round {row.round}, {row.node_name}: figures refused — {row.refused}")
    chart = cost_chart_frame(per)
    if chart.empty:
        common.note_absent("No node reported device time for this run.")
        return
    st.altair_chart(charts.cost_chart(chart), width="stretch")


st.title("Protections and costs")
runs = common.fetch(queries.runs)
if runs.empty:
    common.note_absent(
        "No runs yet.", why="Start one with `fedtune coordinator start` or `fedtune demo`."
    )
else:
    chosen = common.pick_run(runs, key="costs-run")
    if chosen is not None:
        protections_section(chosen)
        costs_section(chosen)
