"""Privacy budget: per node and data set, epsilon spent over rounds against its cap, the
remaining budget, delta and accountant; budget groups (data sets holding the same people,
``data.shares_budget_with``) with their combined spend as the node's guard counts it; the
rounds nodes declined for lack of budget; and whether each node's ledger copy verifies
against the node's key stored in the database (a long copy on request, so that the page
opens at once; its verdict stands for every visitor until the copy changes)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from fedtune.dashboard import charts, common, queries
from fedtune.dashboard.summaries import (
    budget_declines,
    budget_group_summary,
    budget_series,
    budget_summary,
    epsilon_side_by_side,
    short_fingerprint,
    thinned,
)

CHART_POINTS = 2_000  # per data set: a browser draws a line of many more slowly
ENTRIES_PER_SECOND = 8_000  # verifying a copy with two CPUs, reading included (roughly)

VERDICT_ICONS = {
    "verifies": "✅ verifies",
    "fails": "❌ fails",
    "incomplete": "⚠️ incomplete",
    "unverifiable": "⚠️ cannot verify",
    "empty": "— no entries",
}


def budget_section(everything: pd.DataFrame) -> None:
    if everything.empty:
        common.note_absent(
            "No privacy records yet.",
            why="Each node sends a signed ledger entry of what its data set has spent after "
            "every round it trains.",
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
        epsilon = common.number(row["epsilon_after"])
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
        if row["unsigned_rounds"]:
            column.info(
                f"{row['unsigned_rounds']} round(s) recorded by fedtune 0.1 without a signed "
                "ledger entry: shown as reported, not verified."
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
                "epsilon": summary["epsilon_after"],
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


def groups_section(everything: pd.DataFrame) -> None:
    """Only when some node stated a budget group."""
    groups = budget_group_summary(common.fetch(queries.budget_groups), everything)
    if groups.empty:
        return
    st.subheader("Budget groups")
    st.caption(
        "Data sets that hold the same people share one budget (the node's "
        "data.shares_budget_with): its budget guard composes the private rounds of all of "
        "them and declines a round that would take the group past its cap. Combined: "
        "composed here from the signed ledger copies, as the guard does. The node's count "
        "is what its guard said after its latest round; it is higher when the node trained "
        "a member of the group outside these runs."
    )
    st.dataframe(
        pd.DataFrame(
            {
                "node": groups["node_name"],
                "data sets": [", ".join(map(short_fingerprint, m)) for m in groups["members"]],
                "combined epsilon": groups["epsilon"],
                "node's count": groups["node_epsilon"],
                "cap": groups["epsilon_cap"],
                "remaining": groups["remaining"],
                "private rounds": groups["rounds"],
                "delta": groups["delta"],
                "accountant": groups["accountant"],
            }
        ),
        hide_index=True,
        column_config={
            "combined epsilon": st.column_config.NumberColumn(format="%.3f"),
            "node's count": st.column_config.NumberColumn(format="%.3f"),
            "remaining": st.column_config.NumberColumn(format="%.3f"),
            "delta": st.column_config.NumberColumn(format="%.0e"),
        },
    )


def chart_section(everything: pd.DataFrame) -> None:
    st.subheader("Epsilon over rounds")
    runs = common.fetch(queries.runs)
    run = common.pick_run(runs, key="privacy-run", allow_all=True)
    series = budget_series(everything)
    if run is not None:
        series = series[series["run_id"] == run]
        x, title = "round", "round"
    else:
        x, title = "step", "rounds trained on the data set (all runs, in order)"
    if series.empty:
        common.note_absent("No privacy records for this run.")
        return
    drawn = thinned(series, most=CHART_POINTS)
    st.altair_chart(charts.epsilon_chart(drawn, x=x, x_title=title), width="stretch")
    st.caption(
        "Solid: epsilon spent after each round. Dashed, same colour: the data set's cap."
        + (
            f" Every round of {len(series):,} would not fit: {len(drawn):,} drawn, evenly "
            "spaced, each data set's first and latest among them."
            if len(drawn) < len(series)
            else ""
        )
    )


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
    heads = common.fetch(queries.ledger_heads)
    if not heads:
        common.note_absent("No ledger copies yet: nodes send a signed entry with every round.")
        return
    verdicts = {head.node: common.known_verdict(head) for head in heads}
    for head in heads:
        if verdicts[head.node] is None and head.entries <= common.VERIFY_ON_SIGHT_ENTRIES:
            verdicts[head.node] = common.verify_copy(head)
    large = [head for head in heads if head.entries > common.VERIFY_ON_SIGHT_ENTRIES]
    waiting = [head for head in large if verdicts[head.node] is None]
    targets = waiting or large
    if targets:
        entries = sum(head.entries for head in targets)
        label = f"Verify {_copies(targets)}{'' if waiting else ' again'} ({entries:,} entries)"
        if st.button(
            label, key="privacy-verify", icon=":material/verified:", help=_duration(entries)
        ):
            with st.spinner(f"Verifying {entries:,} ledger entries…"):
                for head in targets:
                    verdicts[head.node] = common.verify_copy(head)
    st.dataframe(
        pd.DataFrame(
            {
                "node": [head.node for head in heads],
                "entries": [head.entries for head in heads],
                "verdict": [_verdict_label(verdicts[head.node]) for head in heads],
                "detail": [_verdict_detail(head, verdicts[head.node]) for head in heads],
            }
        ),
        hide_index=True,
    )
    for verdict in verdicts.values():
        if verdict is not None and verdict.check.verdict == "fails":
            check = verdict.check
            st.error(f"The ledger copy of {check.node} does not verify: {check.message}")
    st.caption(
        "Checked against each node's public key stored in this database: chain, signatures "
        f"and the signed head. Copies of more than {common.VERIFY_ON_SIGHT_ENTRIES:,} entries "
        "are verified on request; their verdict stands until a new entry arrives. An auditor "
        "verifies the exported file offline (Audit page)."
    )


def _copies(heads: list[queries.CopyHead]) -> str:
    return f"{heads[0].node}'s ledger copy" if len(heads) == 1 else f"{len(heads)} ledger copies"


def _duration(entries: int) -> str:
    return f"takes about {max(1, round(entries / ENTRIES_PER_SECOND)):,} s"


def _verdict_label(verdict: common.Verdict | None) -> str:
    return "⏳ not verified yet" if verdict is None else VERDICT_ICONS[verdict.check.verdict]


def _verdict_detail(head: queries.CopyHead, verdict: common.Verdict | None) -> str:
    if verdict is None:
        return (
            f"{head.entries:,} entries, too many to verify on every visit: press the button "
            f"above ({_duration(head.entries)})"
        )
    if head.entries <= common.VERIFY_ON_SIGHT_ENTRIES:
        return verdict.check.message
    return (
        f"{verdict.check.message} (verified {verdict.at:%Y-%m-%d %H:%M:%S} UTC, in "
        f"{verdict.seconds:.0f} s)"
    )


def plan_section() -> None:
    """Nodes that spent faster than the plan they stated (the coordinator's ahead-of-plan
    alerts); a node on its plan is not listed, however near its cap."""
    st.subheader("Against the plan")
    alerts = common.fetch(queries.health_alerts)
    ahead = alerts[alerts["kind"] == "ahead-of-plan"] if not alerts.empty else alerts
    if ahead.empty:
        common.note_absent(
            "No node has spent ahead of its plan.",
            why="Each node states the epsilon its plan expects by each round; one that spends "
            "more is listed here. A plan that ends at the cap passes 90% of it on the way.",
        )
        return
    st.dataframe(
        ahead[["run_id", "round", "node_name", "message"]].rename(
            columns={"run_id": "run", "node_name": "node"}
        ),
        hide_index=True,
    )


def levels_section(everything: pd.DataFrame) -> None:
    """Each node's own example-level epsilon next to the run's node-level epsilon from the
    coordinator's ledger: two guarantees about different units, never to be added."""
    st.subheader("Example-level and node-level epsilon, per run")
    node_level = common.fetch(queries.node_level_entries)
    both = epsilon_side_by_side(everything, node_level)
    if both.empty:
        common.note_absent("No privacy records yet.")
        return
    st.dataframe(
        pd.DataFrame(
            {
                "run": both["run_id"],
                "node": both["node_name"],
                "data set": [short_fingerprint(f) for f in both["data_fingerprint"]],
                "ε per example (node's own ledger)": both["example_epsilon"],
                "δ (example)": both["example_delta"],
                "ε per node (coordinator's ledger)": both["node_epsilon"],
                "δ (node)": both["node_delta"],
            }
        ),
        hide_index=True,
        column_config={
            "ε per example (node's own ledger)": st.column_config.NumberColumn(format="%.3f"),
            "ε per node (coordinator's ledger)": st.column_config.NumberColumn(format="%.3f"),
            "δ (example)": st.column_config.NumberColumn(format="%.0e"),
            "δ (node)": st.column_config.NumberColumn(format="%.0e"),
        },
    )
    st.caption(
        "Per example: what one training example of the node's data set is protected by, from "
        "the node's signed ledger after its last round of the run (every run on that data set "
        "counts). Per node: what a node's whole data is protected by, from the coordinator's "
        "own signed node-level DP ledger after the run's last noised round; empty when the "
        "run had no node-level DP (aggregation.node_dp)."
    )
    if node_level.empty:
        common.note_absent("No run had node-level DP: no coordinator ledger entries.")


st.title("Privacy budget")
reports = common.fetch(queries.epsilon_reports)
budget_section(reports)
if not reports.empty:
    groups_section(reports)
    chart_section(reports)
plan_section()
declines_section()
ledger_section()
if not reports.empty:
    levels_section(reports)
