"""Model health of one run: loss curves per node and global, on held-out preference pairs
the preference accuracy and reward margin, update norms with outlier flags, participation
per round, and the alerts with their reasons. A signal that cannot be
computed (e.g. single updates hidden by secure aggregation) is named with the reason."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from fedtune.dashboard import charts, common, queries
from fedtune.dashboard.summaries import (
    node_label,
    node_outcomes,
    participation,
    unavailable_signals,
)

LOSS_SIGNALS = {"train-loss", "held-out-loss"}  # drawn from the loss curves instead
PREFERENCE_TITLES = {  # drawn in their own section
    "preference-accuracy": "Preference accuracy (share of held-out pairs whose implicit "
    "reward prefers the chosen answer)",
    "reward-margin": "Reward margin (chosen minus rejected implicit reward, mean over pairs)",
}
SIGNAL_ORDER = ["update-norm", "update-norm-ratio", "cosine-to-aggregate", "participation"]
SIGNAL_TITLES = {
    "update-norm": "Update norm (L2 of the node's step)",
    "update-norm-ratio": "Update norm / median of the other nodes'",
    "cosine-to-aggregate": "Cosine similarity to the aggregate step",
    "participation": "Participation",
    "grpo-mean-reward": "GRPO: mean reward of the sampled completions",
    "grpo-format-share": "GRPO: share of completions in the <think>/<answer> format",
    "grpo-completion-tokens": "GRPO: mean completion length (tokens)",
    "grpo-kl": "GRPO: KL to the base model (per token)",
}


def losses(rounds: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Loss curves, long: round, who (a node or ``global``), kind, value."""
    frames = []
    for phase, metric, kind in (
        ("train", "train-loss", "train"),
        ("evaluate", "held-out-loss", "held-out"),
    ):
        part = metrics[(metrics["phase"] == phase) & (metrics["metric"] == metric)]
        frames.append(
            pd.DataFrame(
                {
                    "round": part["round"],
                    "who": part["node_name"],
                    "kind": kind,
                    "value": part["value"],
                }
            )
        )
    for column, kind in (("train_loss", "train"), ("held_out_loss", "held-out")):
        frames.append(
            pd.DataFrame(
                {"round": rounds["number"], "who": "global", "kind": kind, "value": rounds[column]}
            )
        )
    frame = pd.concat(frames, ignore_index=True)
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    return frame.dropna(subset=["value"])


def loss_section(rounds: pd.DataFrame, metrics: pd.DataFrame) -> None:
    st.subheader("Loss")
    curves = losses(rounds, metrics)
    if curves.empty:
        common.note_absent("No losses recorded for this run yet.")
        return
    st.altair_chart(charts.loss_chart(curves), width="stretch")
    st.caption(
        "Per node: its own training loss, and the global model on its held-out data. "
        "Global (thick): weighted over the nodes."
    )


def preference_section(signals: pd.DataFrame) -> None:
    """Only for a run whose nodes hold held-out preference pairs (DPO data)."""
    rows = signals[signals["signal"].isin(PREFERENCE_TITLES) & signals["value"].notna()]
    if rows.empty:
        return
    st.subheader("Preferences")
    for name, title in PREFERENCE_TITLES.items():
        known = rows[rows["signal"] == name]
        if known.empty:
            continue
        st.markdown(f"**{title}**")
        frame = pd.DataFrame(
            {
                "round": known["round"].astype(int),
                "who": [node_label(n) for n in known["node_name"]],
                "value": known["value"].astype(float),
                "flagged": False,
            }
        )
        st.altair_chart(charts.signal_chart(frame, title=name), width="stretch")
    st.caption(
        "The implicit reward is the DPO reward against the base model (the adapter "
        "disabled): the base model's is 0, so accuracy starts at 0 and margin at 0. Global: "
        "over all nodes' held-out pairs together."
    )


def signals_section(run: str, signals: pd.DataFrame, alerts: pd.DataFrame) -> None:
    st.subheader("Updates")
    signals = signals[
        ~signals["signal"].isin(LOSS_SIGNALS) & ~signals["signal"].isin(PREFERENCE_TITLES)
    ]
    if signals.empty:
        common.note_absent("No health signals recorded for this run yet.")
        return
    outliers = {
        (int(r), n)
        for r, n, kind in zip(alerts["round"], alerts["node_name"], alerts["kind"], strict=True)
        if kind == "outlier-update"
    }
    names = sorted(set(signals["signal"]), key=_signal_rank)
    for name in names:
        rows = signals[signals["signal"] == name]
        known = rows[rows["value"].notna()]
        st.markdown(f"**{SIGNAL_TITLES.get(name, name)}**")
        if not known.empty:
            frame = pd.DataFrame(
                {
                    "round": known["round"].astype(int),
                    "who": [node_label(n) for n in known["node_name"]],
                    "value": known["value"].astype(float),
                    "flagged": [
                        (int(r), n) in outliers
                        for r, n in zip(known["round"], known["node_name"], strict=True)
                    ],
                }
            )
            st.altair_chart(charts.signal_chart(frame, title=name), width="stretch")
            flagged = frame[frame["flagged"]]
            for _, row in flagged.iterrows():
                st.warning(f"Outlier update: {row['who']} in round {row['round']}.")
        for _, absent in unavailable_signals(rows).iterrows():
            st.info(
                f"{name} unavailable (rounds {absent['rounds']}; {absent['nodes']}): "
                f"{absent['reason']}",
                icon=":material/visibility_off:",
            )


def _signal_rank(name: str) -> tuple[int, str]:
    return (SIGNAL_ORDER.index(name) if name in SIGNAL_ORDER else len(SIGNAL_ORDER), name)


def participation_section(run: str, rounds: pd.DataFrame, metrics: pd.DataFrame) -> None:
    st.subheader("Participation")
    if rounds.empty:
        common.note_absent("No rounds finished in this run yet.")
        return
    rejections = common.fetch(queries.rejected_updates, run)
    st.altair_chart(charts.participation_chart(participation(rounds, rejections)), width="stretch")
    outcomes = node_outcomes(rejections, metrics)
    if not outcomes.empty:
        st.dataframe(outcomes)
    left_out = rejections[rejections["phase"] == "train"]
    if not left_out.empty:
        with st.expander(f"Updates not aggregated ({len(left_out)})"):
            st.dataframe(
                pd.DataFrame(
                    {
                        "round": left_out["round"],
                        "node": [node_label(n) for n in left_out["node_name"]],
                        "kind": left_out["kind"],
                        "reason": left_out["reason"],
                    }
                ),
                hide_index=True,
            )


def alerts_section(alerts: pd.DataFrame) -> None:
    st.subheader("Alerts")
    if alerts.empty:
        st.success("No alerts in this run.", icon=":material/check_circle:")
        return
    st.dataframe(
        pd.DataFrame(
            {
                "round": alerts["round"],
                "node": [node_label(n) for n in alerts["node_name"]],
                "kind": alerts["kind"],
                "reason": alerts["message"],
                "raised (UTC)": alerts["created_at"],
            }
        ),
        hide_index=True,
    )


st.title("Model health")
runs = common.fetch(queries.runs)
if runs.empty:
    common.note_absent("No runs yet.")
    st.stop()
run = common.pick_run(runs, key="health-run")
assert run is not None
rounds = common.fetch(queries.rounds, run)
metrics = common.fetch(queries.node_metrics, run)
alerts = common.fetch(queries.health_alerts, run)
signals = common.fetch(queries.health_signals, run)
loss_section(rounds, metrics)
preference_section(signals)
signals_section(run, signals, alerts)
participation_section(run, rounds, metrics)
alerts_section(alerts)
