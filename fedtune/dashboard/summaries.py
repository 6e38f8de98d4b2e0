"""What the pages show, derived from the frames of :mod:`fedtune.dashboard.queries` (pandas
only, no database access)."""

from __future__ import annotations

import numbers

import pandas as pd

# A node declines a round for lack of budget with one of these (budget guard, noise plan).
BUDGET_REASONS = r"budget guard|planned rounds|already spent|epsilon cap|privacy budget"
OUTCOMES = ("accepted", "declined", "failed", "rejected")


def short_fingerprint(fingerprint: str | None) -> str:
    """``sha256:2aae8351...`` as ``2aae8351``: enough to tell data sets apart."""
    if not fingerprint:
        return "unknown data set"
    return fingerprint.split(":", 1)[-1][:8]


def series_label(node: str, fingerprint: str | None) -> str:
    return f"{node} · {short_fingerprint(fingerprint)}"


def budget_series(reports: pd.DataFrame) -> pd.DataFrame:
    """``reports`` with ``series`` (node and data set) and ``step``: the node's rounds on that
    data set, counted over all runs in order (epsilon accumulates across runs)."""
    frame = reports.copy()
    keys = list(
        zip(frame["node_name"].astype(str), frame["data_fingerprint"].fillna(""), strict=True)
    )
    labels = {key: series_label(key[0], key[1] or None) for key in set(keys)}
    frame["series"] = [labels[key] for key in keys]
    frame["step"] = frame.groupby("series").cumcount() + 1
    return frame


def thinned(series: pd.DataFrame, *, most: int) -> pd.DataFrame:
    """At most about ``most`` rows of each ``series``, evenly spaced, its first and last
    always among them (a chart of 100,000 rounds looks the same with 2,000)."""
    if most < 2:
        raise ValueError(f"most must be at least 2, got {most}")
    position = series.groupby("series").cumcount()
    size = series.groupby("series")["series"].transform("size")
    every = (size + most - 1) // most
    keep = (position % every == 0) | (position == size - 1)
    return series[keep]


def budget_summary(reports: pd.DataFrame) -> pd.DataFrame:
    """One row per node and data set: the latest epsilon against its cap, the remaining
    budget, delta, accountant, rounds, and how many rounds ran without DP."""
    rows = []
    for (node, fingerprint), group in budget_series(reports).groupby(
        ["node_name", "data_fingerprint"], sort=True
    ):
        last = group.iloc[-1]
        known = group[group["epsilon_after"].notna()]
        epsilon = float(known["epsilon_after"].iloc[-1]) if not known.empty else None
        cap = _number(last["epsilon_cap"])
        rows.append(
            {
                "series": series_label(str(node), str(fingerprint)),
                "node_name": node,
                "data_fingerprint": fingerprint,
                "epsilon_after": epsilon,
                "epsilon_cap": cap,
                "remaining": None if cap is None or epsilon is None else cap - epsilon,
                "share_used": None if not cap or epsilon is None else epsilon / cap,
                "delta": _number(known["delta"].iloc[-1]) if not known.empty else None,
                "accountant": known["accountant"].iloc[-1] if not known.empty else None,
                "rounds": len(group),
                "non_private_rounds": int((group["mode"] == "non-private").sum()),
                "unsigned_rounds": int((~group["signed"].astype(bool)).sum()),
                "last_run": last["run_id"],
                "last_round": int(last["round"]),
            }
        )
    return pd.DataFrame(rows)


def _number(value: object) -> float | None:
    if not isinstance(value, numbers.Real) or pd.isna(value):
        return None
    return float(value)


def budget_declines(rejections: pd.DataFrame) -> pd.DataFrame:
    """The rounds nodes declined for lack of privacy budget."""
    declined = rejections[rejections["kind"] == "declined"]
    matches = declined["reason"].fillna("").str.contains(BUDGET_REASONS, case=False, regex=True)
    return declined[matches].reset_index(drop=True)


def participation(rounds: pd.DataFrame, rejections: pd.DataFrame) -> pd.DataFrame:
    """Per training round, how many sampled nodes' updates were accepted, declined, failed
    or rejected (long: round, outcome, nodes)."""
    train = rejections[rejections["phase"] == "train"]
    rows = []
    for number, accepted in zip(rounds["number"], rounds["updates_accepted"], strict=True):
        counts = train.loc[train["round"] == number, "kind"].value_counts()
        rows.append({"round": int(number), "outcome": "accepted", "nodes": int(accepted)})
        rows += [
            {"round": int(number), "outcome": kind, "nodes": int(counts.get(kind, 0))}
            for kind in OUTCOMES[1:]
        ]
    return pd.DataFrame(rows, columns=["round", "outcome", "nodes"])


def node_outcomes(rejections: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Per round and node, what became of its training: accepted, declined, failed, rejected
    (wide: one column per round)."""
    train = metrics[metrics["phase"] == "train"].drop_duplicates(["round", "node_name"])
    rows = [
        {"round": int(r), "node_name": n, "outcome": "accepted"}
        for r, n in zip(train["round"], train["node_name"], strict=True)
    ]
    left_out = rejections[rejections["phase"] == "train"]
    outcome = {(row["round"], row["node_name"]): row["outcome"] for row in rows}
    for r, n, kind in zip(left_out["round"], left_out["node_name"], left_out["kind"], strict=True):
        outcome[(int(r), n if isinstance(n, str) else "unknown node")] = kind
    if not outcome:
        return pd.DataFrame()
    frame = pd.DataFrame([{"round": r, "node": n, "outcome": o} for (r, n), o in outcome.items()])
    return frame.pivot(index="node", columns="round", values="outcome").fillna("not sampled")


def unavailable_signals(signals: pd.DataFrame) -> pd.DataFrame:
    """Signals that could not be computed, grouped by signal and reason, with their rounds."""
    absent = signals[signals["value"].isna() & signals["unavailable"].notna()]
    rows = [
        {
            "signal": signal,
            "reason": reason,
            "rounds": _ranges(sorted(set(group["round"].astype(int)))),
            "nodes": ", ".join(
                sorted({n if isinstance(n, str) else "global" for n in group["node_name"]})
            ),
        }
        for (signal, reason), group in absent.groupby(["signal", "unavailable"], sort=True)
    ]
    return pd.DataFrame(rows, columns=["signal", "reason", "rounds", "nodes"])


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 5]`` as ``1-3, 5``."""
    parts: list[str] = []
    for number in numbers:
        if parts and number == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{number}"
        else:
            parts.append(str(number))
    return ", ".join(parts)


def node_label(node: object) -> str:
    """A node's name, or ``global`` for the global model (node None)."""
    return node if isinstance(node, str) else "global"
