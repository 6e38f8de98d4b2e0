"""The dashboard's charts (Altair), each from a frame prepared by the page."""

from __future__ import annotations

import altair as alt
import pandas as pd

CAP_DASH = [6, 4]


def epsilon_chart(series: pd.DataFrame, *, x: str, x_title: str) -> alt.LayerChart:
    """Epsilon spent per node and data set (solid lines) against its cap (dashed, same
    colour). ``series`` comes from :func:`~fedtune.dashboard.summaries.budget_series`."""
    color = alt.Color("series:N", title="node · data set")
    tooltip = [
        alt.Tooltip("series:N", title="node · data set"),
        alt.Tooltip("run_name:N", title="run"),
        alt.Tooltip("round:Q", title="round"),
        alt.Tooltip("epsilon_after:Q", title="epsilon", format=".3f"),
        alt.Tooltip("epsilon_cap:Q", title="cap"),
        alt.Tooltip("delta:Q", title="delta", format="g"),
        alt.Tooltip("accountant:N"),
    ]
    base = alt.Chart(series).encode(x=alt.X(f"{x}:Q", title=x_title, axis=alt.Axis(tickMinStep=1)))
    spent = base.mark_line(point=True).encode(
        y=alt.Y("epsilon_after:Q", title="epsilon"), color=color, tooltip=tooltip
    )
    cap = (
        base.transform_filter("isValid(datum.epsilon_cap)")
        .mark_line(strokeDash=CAP_DASH, opacity=0.8)
        .encode(y="epsilon_cap:Q", color=color, tooltip=tooltip)
    )
    return alt.LayerChart(layer=[spent, cap], height=320)


def loss_chart(losses: pd.DataFrame) -> alt.Chart:
    """Loss per round (long frame: round, who, kind, value); global curves drawn thicker."""
    return (
        alt.Chart(losses)
        .mark_line(point=True)
        .encode(
            x=alt.X("round:Q", title="round", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("value:Q", title="loss", scale=alt.Scale(zero=False)),
            color=alt.Color("who:N", title="node"),
            strokeDash=alt.StrokeDash("kind:N", title="loss"),
            strokeWidth=alt.condition("datum.who == 'global'", alt.value(3), alt.value(1.5)),
            tooltip=["who:N", "kind:N", "round:Q", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(height=300)
    )


def signal_chart(signals: pd.DataFrame, *, title: str) -> alt.LayerChart:
    """One health signal per round and node (frame: round, who, value, flagged); flagged
    points (outlier alerts) are drawn large and red."""
    base = alt.Chart(signals).encode(
        x=alt.X("round:Q", title="round", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("value:Q", title=title),
        tooltip=["who:N", "round:Q", alt.Tooltip("value:Q", format=".4g"), "flagged:N"],
    )
    lines = base.mark_line(point=True).encode(color=alt.Color("who:N", title="node"))
    flags = base.transform_filter("datum.flagged").mark_point(
        color="red", size=160, shape="diamond", filled=False, strokeWidth=2
    )
    return alt.LayerChart(layer=[lines, flags], height=240)


def participation_chart(participation: pd.DataFrame) -> alt.Chart:
    """Per round, the sampled nodes by outcome (stacked bars)."""
    outcomes = ["accepted", "declined", "failed", "rejected"]
    return (
        alt.Chart(participation[participation["nodes"] > 0])
        .mark_bar()
        .encode(
            x=alt.X("round:O", title="round"),
            y=alt.Y("nodes:Q", title="nodes", axis=alt.Axis(tickMinStep=1)),
            color=alt.Color(
                "outcome:N",
                scale=alt.Scale(
                    domain=outcomes, range=["#4c9a2a", "#e0a800", "#c0392b", "#7f3c8d"]
                ),
            ),
            tooltip=["round:O", "outcome:N", "nodes:Q"],
        )
        .properties(height=240)
    )


def difference_chart(results: pd.DataFrame) -> alt.FacetChart:
    """Each metric's difference B - A with its confidence interval (error bar), overall and
    per node, against a zero line; one row per metric, each with its own scale."""
    base = alt.Chart().encode(
        y=alt.Y("scope:N", title=None, sort=alt.SortField("order")),
        tooltip=[
            "metric:N",
            "scope:N",
            alt.Tooltip("difference:Q", format=".4g"),
            alt.Tooltip("ci_low:Q", format=".4g"),
            alt.Tooltip("ci_high:Q", format=".4g"),
            alt.Tooltip("p_value:Q", format=".3g"),
            "verdict:N",
        ],
    )
    bars = base.mark_rule(strokeWidth=2).encode(
        x=alt.X("ci_low:Q", title="difference B − A"), x2="ci_high:Q"
    )
    points = base.mark_point(filled=True, size=80).encode(
        x="difference:Q", color=alt.Color("verdict:N", title="verdict")
    )
    zero = alt.Chart().mark_rule(color="gray", strokeDash=[3, 3]).encode(x=alt.datum(0))
    return (
        alt.layer(zero, bars, points, data=results)
        .facet(row=alt.Row("metric:N", title=None))
        .resolve_scale(x="independent")
    )


def cost_chart(costs: pd.DataFrame) -> alt.Chart:
    """Device-seconds per round, one bar per node (colour), stacked by compute (training
    solid, evaluation light);
    the frame comes from :func:`~fedtune.dashboard.summaries.cost_chart_frame`."""
    return (
        alt.Chart(costs)
        .mark_bar()
        .encode(
            x=alt.X("round:O", title="round", axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("node_name:N", title="node"),
            y=alt.Y("seconds:Q", title="device-seconds", stack="zero"),
            color=alt.Color("node_name:N", title="node"),
            opacity=alt.Opacity(
                "compute:N",
                title="compute",
                scale=alt.Scale(domain=["training", "evaluation"], range=[1.0, 0.45]),
            ),
            tooltip=[
                alt.Tooltip("node_name:N", title="node"),
                "round:O",
                "compute:N",
                alt.Tooltip("seconds:Q", title="device-seconds", format=".2f"),
                alt.Tooltip("tokens:Q", title="tokens read (round)", format=","),
            ],
        )
        .properties(height=300)
    )
