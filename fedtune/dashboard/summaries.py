"""What the pages show, derived from the frames of :mod:`fedtune.dashboard.queries` (pandas
only, no database access)."""

from __future__ import annotations

import numbers

import pandas as pd

from fedtune.privacy.accounting import epsilon_of

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


def budget_group_summary(groups: pd.DataFrame, reports: pd.DataFrame) -> pd.DataFrame:
    """One row per node and budget group (data sets holding the same people, stated by the
    node with ``data.shares_budget_with``): the group's epsilon composed, as the node's
    budget guard composes it, from every private round on any of its data sets in the
    ledger copies (at the latest round's delta and accountant), against the cap; beside it
    what the node's guard said after its latest round (its word; more than the copies show
    when it trained a member alone)."""
    columns = [
        "node_name",
        "members",
        "epsilon",
        "node_epsilon",
        "epsilon_cap",
        "remaining",
        "rounds",
        "delta",
        "accountant",
    ]
    if groups.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    latest = groups.assign(key=[tuple(m) for m in groups["members"]]).groupby(
        ["node_name", "key"], sort=True
    )
    for (node, members), stated in latest:
        mine = reports[
            (reports["node_name"] == node)
            & reports["data_fingerprint"].isin(members)
            & (reports["mode"] == "dp")
            & reports["noise_multiplier"].notna()
        ]
        known = mine[mine["delta"].notna() & mine["accountant"].notna()]
        epsilon = cap = delta = accountant = None
        if not known.empty:
            last = known.iloc[-1]
            delta, accountant = float(last["delta"]), str(last["accountant"])
            cap = last["epsilon_cap"]
            history = list(
                zip(mine["noise_multiplier"], mine["sample_rate"], mine["steps"], strict=True)
            )
            epsilon = epsilon_of(
                [(float(s), float(q), int(n)) for s, q, n in history],
                delta=delta,
                accountant=accountant,  # type: ignore[arg-type]
            )
        cap = _number(cap)
        rows.append(
            {
                "node_name": node,
                "members": list(members),
                "epsilon": epsilon,
                "node_epsilon": _number(stated["epsilon_after"].iloc[-1]),
                "epsilon_cap": cap,
                "remaining": None if cap is None or epsilon is None else cap - epsilon,
                "rounds": len(mine),
                "delta": delta,
                "accountant": accountant,
            }
        )
    return pd.DataFrame(rows, columns=columns)


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


# --- costs ------------------------------------------------------------------------------------

COST_SUMS = (
    "train_tokens",
    "evaluate_tokens",
    "train_device_seconds",
    "evaluate_device_seconds",
    "wall_seconds",
)
NODE_ROUND_COLUMNS = ("round", "node_name", "tokens", *COST_SUMS, "refused")


def costs_per_node_round(costs: pd.DataFrame) -> pd.DataFrame:
    """One row per round and node from the replies' cost figures (:func:`~fedtune.dashboard.
    queries.node_costs`): each figure summed over the node's train and evaluate replies of
    the round (``tokens``: training and evaluation tokens read); None where the node sent
    none of it; the coordinator's refusals joined."""
    if costs.empty:
        return pd.DataFrame(columns=list(NODE_ROUND_COLUMNS))
    grouped = costs.groupby(["round", "node_name"], sort=True)
    out = grouped[list(COST_SUMS)].sum(min_count=1).reset_index()
    out["tokens"] = out[["train_tokens", "evaluate_tokens"]].sum(axis=1, min_count=1)
    refused = grouped["refused"].agg(
        lambda notes: "; ".join(n for n in notes if isinstance(n, str) and n) or None
    )
    out["refused"] = list(refused)
    return out[list(NODE_ROUND_COLUMNS)]


def cost_chart_frame(per_node_round: pd.DataFrame) -> pd.DataFrame:
    """Device-seconds per round and node, long (round, node_name, compute, seconds, tokens),
    for the cost chart; figures not sent are left out."""
    rows = []
    for row in per_node_round.itertuples():
        for column, compute in (
            ("train_device_seconds", "training"),
            ("evaluate_device_seconds", "evaluation"),
        ):
            value = getattr(row, column)
            if pd.notna(value):
                rows.append(
                    {
                        "round": int(row.round),
                        "node_name": row.node_name,
                        "compute": compute,
                        "seconds": float(value),
                        "tokens": None if pd.isna(row.tokens) else float(row.tokens),
                    }
                )
    return pd.DataFrame(rows, columns=["round", "node_name", "compute", "seconds", "tokens"])


# --- protections ------------------------------------------------------------------------------

PROTECTION_LABELS = {
    "tls": "TLS",
    "node_authentication": "node authentication",
    "gateway": "gateway (Fleet API only)",
    "pinned_apps": "pinned apps",
    "secure_aggregation": "secure aggregation",
    "example_level_dp": "example-level DP (DP-SGD, each node)",
    "node_level_dp": "node-level DP (coordinator)",
    "metric_release": "metric release",
    "witness_receipts": "witness receipts",
    "checkpoint_encryption": "checkpoint encryption",
}
NOT_RECORDED = "not recorded"


def release_seen(metrics: pd.DataFrame, rejections: pd.DataFrame) -> dict[str, str]:
    """Each node's metric release as its stored replies show it: ``dp`` (its held-out figures
    came with their noise scale), ``plain`` (figures as computed), ``none`` (its evaluate
    replies released nothing)."""
    seen: dict[str, str] = {}
    for node, group in metrics.groupby("node_name"):
        names = set(group["metric"])
        if "held-out-loss-noise" in names:
            seen[str(node)] = "dp"
        elif names & {"train-loss", "held-out-tokens"}:
            seen[str(node)] = "plain"
    declined = rejections[
        (rejections["phase"] == "evaluate")
        & rejections["reason"].fillna("").str.contains("released no evaluation metrics")
    ]
    for node in declined["node_name"].dropna():
        seen.setdefault(str(node), "none")
    return seen


def protection_rows(
    stored: dict | None,
    *,
    records: pd.DataFrame,
    node_level: pd.DataFrame,
    evidence: dict[str, int],
    release: dict[str, str],
) -> pd.DataFrame:
    """One row per protection of a run: its state and settings as recorded when the run
    started (``stored``, :mod:`fedtune.coordinator.run_protections`), and what the run's own
    records show (its signed ledger copies, the coordinator's node-level ledger, receipts,
    the replies)."""
    shown: dict[str, str] = {
        "example_level_dp": _example_level(records),
        "node_level_dp": _node_level(node_level),
        "witness_receipts": (
            f"{evidence['receipts']} of {evidence['entries']} ledger entries of this run "
            "countersigned by the coordinator"
        ),
        "metric_release": ", ".join(f"{n}: {p}" for n, p in sorted(release.items())) or "—",
    }
    names = [name for name in PROTECTION_LABELS if name in (stored or {}) or name in shown]
    rows = []
    for name in names:
        item = (stored or {}).get(name)
        rows.append(
            {
                "protection": PROTECTION_LABELS[name],
                "state": item.get("state", NOT_RECORDED)
                if isinstance(item, dict)
                else NOT_RECORDED,
                "as recorded when the run started": item.get("detail", "")
                if isinstance(item, dict)
                else "",
                "what the run's records show": shown.get(name, "—"),
            }
        )
    return pd.DataFrame(rows)


def _example_level(records: pd.DataFrame) -> str:
    if records.empty:
        return "no ledger entries for this run"
    parts = []
    for node, group in records.groupby("node_name", sort=True):
        last = group.iloc[-1]
        if last["mode"] == "non-private":
            parts.append(f"{node}: NON-PRIVATE")
            continue
        epsilon = last["epsilon_after"]
        parts.append(f"{node}: ε {epsilon:.3f}" if pd.notna(epsilon) else f"{node}: ε —")
        details = [f"δ {last['delta']:g}" if pd.notna(last["delta"]) else None]
        details.append(
            f"σ {last['noise_multiplier']:.3g}" if pd.notna(last["noise_multiplier"]) else None
        )
        details.append(
            f"clip {last['max_grad_norm']:g}" if pd.notna(last["max_grad_norm"]) else None
        )
        details.append(str(last["accountant"]) if last["accountant"] else None)
        parts[-1] += " (" + ", ".join(d for d in details if d) + ")"
        if not bool(group["signed"].all()):
            parts[-1] += " [unsigned reports]"
    return "; ".join(parts) + " — each node's signed ledger, after its last round of this run"


def _node_level(node_level: pd.DataFrame) -> str:
    if node_level.empty:
        return "no node-level ledger entries for this run"
    last = node_level.iloc[-1]
    return (
        f"ε {last['epsilon_after']:.3f} after round {int(last['round'])} (δ {last['delta']:g}, "
        f"σ {last['noise_multiplier']:.3g}, clip {last['max_grad_norm']:g}); "
        f"{len(node_level)} entries in the coordinator's signed ledger"
    )


# --- example-level and node-level epsilon, side by side ---------------------------------------


def epsilon_side_by_side(reports: pd.DataFrame, node_level: pd.DataFrame) -> pd.DataFrame:
    """Per run and node: the node's own example-level epsilon (its signed ledger, on its data
    set, after its last round of the run: all its runs on that data set count) next to the
    run's node-level epsilon (the coordinator's ledger, after the run's last noised round;
    None when the run had no node-level DP)."""
    columns = [
        "run_id",
        "node_name",
        "data_fingerprint",
        "example_epsilon",
        "example_delta",
        "node_epsilon",
        "node_delta",
    ]
    if reports.empty:
        return pd.DataFrame(columns=columns)
    latest = node_level.sort_values("seq").groupby("run_id").tail(1).set_index("run_id")
    rows = []
    for (run, node), group in reports.groupby(["run_id", "node_name"], sort=False):
        last = group.iloc[-1]
        coordinator = latest.loc[run] if run in latest.index else None
        rows.append(
            {
                "run_id": run,
                "node_name": node,
                "data_fingerprint": last["data_fingerprint"],
                "example_epsilon": last["epsilon_after"],
                "example_delta": last["delta"],
                "node_epsilon": None if coordinator is None else coordinator["epsilon_after"],
                "node_delta": None if coordinator is None else coordinator["delta"],
            }
        )
    return pd.DataFrame(rows, columns=columns)
