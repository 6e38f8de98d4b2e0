"""A/B tests: each test's versions and metrics, the difference B − A with its confidence
interval, p-value and verdict, overall and per node, and a chart of the differences."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from fedtune.dashboard import charts, common, queries

# What a metric's per-example score is, where its name does not say (shown under the result).
METRIC_NOTES = {
    "preference-accuracy": "share of held-out preference pairs whose implicit DPO reward "
    "prefers the chosen answer",
    "reward-margin": "per held-out pair, the chosen answer's implicit DPO reward minus the "
    "rejected one's",
    "reward": "per held-out GRPO prompt, the greedy completion's summed verifiable reward "
    "(each of the node's training.grpo_rewards counted in [0, 1]: 0 to the number of rewards)",
}


def test_label(row: pd.Series) -> str:
    started = row["started_at"]
    when = f", {started:%Y-%m-%d %H:%M}" if pd.notna(started) else ""
    return f"{row['version_b']} vs {row['version_a']} ({row['status']}{when}) · {row['id']}"


def results_table(results: pd.DataFrame) -> pd.DataFrame:
    """The results as a person reads them: one row per metric (and node)."""
    return pd.DataFrame(
        {
            "node": results["scope"],
            "metric": results["metric"],
            "better when": ["higher" if h else "lower" for h in results["higher_is_better"]],
            "mean A": results["mean_a"],
            "mean B": results["mean_b"],
            "difference B − A": results["difference"],
            "confidence interval": [
                f"{common.number(c, '.0%')}: [{common.number(lo, '.4g')}, "
                f"{common.number(hi, '.4g')}]"
                for c, lo, hi in zip(
                    results["confidence"], results["ci_low"], results["ci_high"], strict=True
                )
            ],
            "p-value": results["p_value"],
            "p (Holm)": results["p_adjusted"],
            "verdict": results["verdict"],
            "examples": results["examples"],
            "test": results["test"],
        }
    )


def show_test(test: pd.Series) -> None:
    st.markdown(
        f"**A:** `{test['version_a']}` &nbsp; **B:** `{test['version_b']}` &nbsp; "
        f"state: **{test['status']}**, alpha {test['alpha']:g}"
    )
    nodes = test["nodes"] if isinstance(test["nodes"], dict) else {}
    metrics = test["metrics"] if isinstance(test["metrics"], dict) else {}
    st.caption(
        f"Metrics requested: {', '.join(metrics.get('names') or []) or '—'}. "
        f"Nodes answered: {', '.join(nodes.get('answered') or []) or 'none yet'}."
    )
    if test["status"] == "failed":
        st.error(f"The test failed: {test['error'] or 'no reason recorded'}")
    results = common.fetch(queries.ab_results, str(test["id"]))
    if results.empty:
        common.note_absent(
            "No results for this test yet."
            if test["status"] == "running"
            else "This test recorded no results."
        )
        return
    overall = results[results["scope"] == "overall"]
    per_node = results[results["scope"] != "overall"]
    if results["test"].astype(str).str.contains("(DP)", regex=False).any():
        st.info(
            "Some nodes released their statistics under differential privacy "
            '(privacy.release_metrics = "dp"): tests marked (DP) include that noise, so their '
            "intervals are wider than the data alone would give."
        )
    st.subheader("Overall")
    if overall.empty:
        common.note_absent("No overall result: only per-node results were recorded.")
    for _, row in overall.iterrows():
        st.markdown(
            f"**{row['metric']}** ({'higher' if row['higher_is_better'] else 'lower'} is "
            f"better): **{row['verdict']}** — B − A = {common.number(row['difference'], '+.4g')}, "
            f"{common.number(row['confidence'], '.0%')} CI "
            f"[{common.number(row['ci_low'], '.4g')}, {common.number(row['ci_high'], '.4g')}], "
            f"p = {common.number(row['p_value'], '.3g')}"
            + (
                f" (Holm-adjusted {common.number(row['p_adjusted'], '.3g')})"
                if pd.notna(row["p_adjusted"])
                else ""
            )
        )
        if row["metric"] in METRIC_NOTES:
            st.caption(f"{row['metric']}: {METRIC_NOTES[row['metric']]}.")
    if not overall.empty:
        st.dataframe(results_table(overall).drop(columns="node"), hide_index=True)
    st.subheader("Per node")
    if per_node.empty:
        common.note_absent("No per-node results were recorded.")
    else:
        st.dataframe(results_table(per_node), hide_index=True)
    plotted = results.dropna(subset=["difference", "ci_low", "ci_high"]).copy()
    if plotted.empty:
        common.note_absent("No difference with a confidence interval to plot.")
        return
    plotted["order"] = [0 if scope == "overall" else 1 for scope in plotted["scope"]]
    st.subheader("Differences with confidence intervals")
    st.altair_chart(charts.difference_chart(plotted), width="stretch")
    st.caption("Dots: difference B − A; bars: its confidence interval; dashed: no difference.")


st.title("A/B tests")
tests = common.fetch(queries.ab_tests)
if tests.empty:
    common.note_absent(
        "No A/B tests yet.",
        why="An A/B test compares two model versions on the nodes' held-out data.",
    )
    st.stop()
labels = {str(row["id"]): test_label(row) for _, row in tests.iterrows()}
chosen = st.selectbox("Test", list(labels), format_func=labels.__getitem__, key="ab-test")
show_test(tests[tests["id"] == chosen].iloc[0])
