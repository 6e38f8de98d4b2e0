"""Every dashboard page against a database filled by a real federated run (Flower's Simulation
Engine, DP-LoRA on a tiny model, two nodes, the bank declining round 2 at its cap) and a real
A/B test: the figures each page shows are the figures the database holds, and showing them
changes nothing in the database file."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import streamlit as st
from sqlalchemy import select
from sqlalchemy.engine import Engine

from conftest import FEDERATED_BANK_CAP, FederatedRun
from dashboard_data import chart_data, frames, open_page, texts
from fedtune.common.database import transaction
from fedtune.platform.db.storage import (
    AbTestResult,
    HealthAlert,
    NodeCost,
    NodeMetric,
    RejectedUpdate,
    Round,
    Run,
    open_database,
)
from fedtune.privacy.ledger import LedgerEntry
from fedtune.privacy.ledger_store import LedgerEntryRow, ledger_entries

pytestmark = pytest.mark.simulation

BANK_CAP = FEDERATED_BANK_CAP

PAGES = [
    None,
    "views/privacy.py",
    "views/ab_tests.py",
    "views/health.py",
    "views/audit.py",
    "views/costs.py",
]


@pytest.fixture(scope="module")
def real_run(federated_run: FederatedRun) -> FederatedRun:
    return federated_run


@pytest.fixture(scope="module")
def db(real_run: FederatedRun) -> Iterator[Engine]:
    """The coordinator's database as the tests read it, beside the dashboard."""
    engine = open_database(real_run.url, create=False)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def fresh_figures():
    """Each test reads the database anew: nothing cached by a page of another test."""
    st.cache_data.clear()
    yield
    st.cache_data.clear()


def ledger_copy(db: Engine, node: str) -> list[LedgerEntry]:
    with transaction(db) as session:
        return ledger_entries(session, node)


def all_rows(db: Engine, model: type[Any], *where: Any) -> list[Any]:
    with transaction(db) as session:
        return list(session.scalars(select(model).where(*where).order_by(model.id)))


# --- Overview --------------------------------------------------------------------------------


def test_overview_shows_the_runs_state_rounds_nodes_and_loss_as_stored(real_run, db, monkeypatch):
    with transaction(db) as session:
        run = session.get(Run, real_run.run_id)
        assert run is not None
        status, planned = run.status, run.rounds_planned
    rounds = all_rows(db, Round, Round.run_id == real_run.run_id)

    app = open_page(real_run.url, None, monkeypatch)

    shown = frames(app)[0].set_index("run").loc[real_run.run_id]
    assert shown["state"] == status == "finished"
    assert shown["rounds done"] == f"{len(rounds)} / {planned}" == "2 / 2"
    assert shown["nodes"] == 2 and shown["node names"] == "bank, hospital"
    assert shown["global held-out loss"] == max(rounds, key=lambda r: r.number).held_out_loss
    assert {m.label: m.value for m in app.metric}["Finished"] == "1"


def test_overview_lists_the_stored_alerts_newest_first(real_run, db, monkeypatch):
    alerts = all_rows(db, HealthAlert)

    app = open_page(real_run.url, None, monkeypatch)

    shown = frames(app)[1]
    assert shown[["round", "node", "kind", "reason"]].values.tolist() == [
        [a.round, a.node_name or "global", a.kind, a.message] for a in reversed(alerts)
    ]
    assert "declined" in set(shown["kind"])


# --- Privacy budget --------------------------------------------------------------------------


def test_privacy_page_shows_each_nodes_epsilon_as_its_ledger_records_it(real_run, db, monkeypatch):
    app = open_page(real_run.url, "views/privacy.py", monkeypatch)

    metrics = {m.label.split(" · ")[0]: (m.value, m.proto.delta) for m in app.metric}
    table = frames(app)[0].set_index("node")
    for node in ("hospital", "bank"):
        last = ledger_copy(db, node)[-1]
        assert last.epsilon_after is not None and last.epsilon_cap is not None
        assert metrics[node] == (
            f"ε {last.epsilon_after:.3f} of {last.epsilon_cap:g}",
            f"{last.epsilon_cap - last.epsilon_after:.3f} left",
        )
        assert table.loc[node, "epsilon"] == last.epsilon_after
        assert table.loc[node, "cap"] == last.epsilon_cap
        assert table.loc[node, "remaining"] == pytest.approx(last.epsilon_cap - last.epsilon_after)
        assert table.loc[node, "delta"] == last.delta
        assert table.loc[node, "rounds"] == len(ledger_copy(db, node))
    assert table.loc["bank", "cap"] == BANK_CAP


def test_privacy_chart_draws_every_signed_ledger_copy(real_run, db, monkeypatch):
    copies = [row.sealed() for row in all_rows(db, LedgerEntryRow)]

    app = open_page(real_run.url, "views/privacy.py", monkeypatch)

    drawn = chart_data(app).sort_values(["node_name", "round"])
    assert drawn[["node_name", "round", "epsilon_after", "epsilon_cap"]].values.tolist() == [
        [e.node, e.round, e.epsilon_after, e.epsilon_cap]
        for e in sorted(copies, key=lambda e: (e.node, e.round))
    ]


def test_privacy_page_lists_the_round_the_bank_declined_at_its_cap(real_run, db, monkeypatch):
    declined = all_rows(db, RejectedUpdate, RejectedUpdate.kind == "declined")

    app = open_page(real_run.url, "views/privacy.py", monkeypatch)

    shown = frames(app)[1]
    assert shown[["round", "node", "reason"]].values.tolist() == [
        [d.round, d.node_name, d.reason] for d in declined
    ]
    assert shown["node"].tolist() == ["bank"] and shown["round"].tolist() == [2]


def test_privacy_page_verifies_both_ledger_copies_with_the_stored_entry_counts(
    real_run, db, monkeypatch
):
    app = open_page(real_run.url, "views/privacy.py", monkeypatch)

    copies = frames(app)[2].set_index("node")
    for node in ("hospital", "bank"):
        assert copies.loc[node, "entries"] == len(ledger_copy(db, node))
        assert copies.loc[node, "verdict"] == "✅ verifies", copies.loc[node, "detail"]
    assert not app.error


# --- A/B tests -------------------------------------------------------------------------------


def test_ab_page_shows_the_stored_difference_interval_and_p_value(real_run, db, monkeypatch):
    results = {
        r.scope: r for r in all_rows(db, AbTestResult, AbTestResult.test_id == real_run.test_id)
    }
    overall = results["overall"]

    app = open_page(real_run.url, "views/ab_tests.py", monkeypatch)

    assert app.selectbox(key="ab-test").value == real_run.test_id
    shown = frames(app)[0].set_index("metric").loc["loss"]
    assert shown["difference B − A"] == overall.difference
    assert shown["p-value"] == overall.p_value
    assert shown["verdict"] == overall.verdict
    assert shown["examples"] == overall.examples == 12
    assert shown["mean A"] == overall.mean_a and shown["mean B"] == overall.mean_b
    assert (
        f"B − A = {overall.difference:+.4g}, 95% CI [{overall.ci_low:.4g}, {overall.ci_high:.4g}]"
        f", p = {overall.p_value:.3g}" in texts(app)
    )


def test_ab_page_breaks_the_stored_results_down_per_node(real_run, db, monkeypatch):
    results = all_rows(db, AbTestResult, AbTestResult.test_id == real_run.test_id)
    per_node = {r.scope: r for r in results if r.scope != "overall"}

    app = open_page(real_run.url, "views/ab_tests.py", monkeypatch)

    shown = frames(app)[1].set_index("node")
    assert sorted(shown.index) == sorted(per_node) == ["bank", "hospital"]
    for node, result in per_node.items():
        assert shown.loc[node, "difference B − A"] == result.difference
        assert shown.loc[node, "p-value"] == result.p_value
        assert shown.loc[node, "examples"] == result.examples == 6
    plotted = chart_data(app).set_index("scope")
    assert plotted.loc["overall", "difference"] == next(
        r.difference for r in results if r.scope == "overall"
    )


# --- Model health ----------------------------------------------------------------------------


def test_health_page_plots_the_stored_losses(real_run, db, monkeypatch):
    rounds = all_rows(db, Round, Round.run_id == real_run.run_id)
    evaluated = all_rows(db, NodeMetric, NodeMetric.phase == "evaluate")

    app = open_page(real_run.url, "views/health.py", monkeypatch)

    losses = chart_data(app, 0)
    curve = losses[losses["who"] == "global"].set_index(["kind", "round"])["value"]
    for r in rounds:
        assert curve.loc[("held-out", r.number)] == r.held_out_loss
        assert curve.loc[("train", r.number)] == r.train_loss
    per_node = losses[(losses["who"] != "global") & (losses["kind"] == "held-out")]
    assert sorted(per_node[["who", "round", "value"]].values.tolist()) == sorted(
        [m.node_name, m.round, m.metrics["held-out-loss"]] for m in evaluated
    )


def test_health_page_shows_participation_as_stored(real_run, db, monkeypatch):
    rounds = all_rows(db, Round, Round.run_id == real_run.run_id)
    declined = all_rows(db, RejectedUpdate, RejectedUpdate.kind == "declined")

    app = open_page(real_run.url, "views/health.py", monkeypatch)

    bars = participation_bars(app)
    for r in rounds:
        assert bars.get((r.number, "accepted"), 0) == r.updates_accepted
        assert bars.get((r.number, "declined"), 0) == sum(d.round == r.number for d in declined)
    outcomes = next(f for f in frames(app) if 2 in f.columns)
    assert outcomes.loc["hospital"].tolist() == ["accepted", "accepted"]
    assert outcomes.loc["bank"].tolist() == ["accepted", "declined"]


def participation_bars(app) -> dict[tuple[int, str], int]:
    """The participation chart's bars: (round, outcome) -> nodes."""
    for index, chart in enumerate(app.get("vega_lite_chart")):
        if '"outcome"' in chart.proto.spec:
            data = chart_data(app, index)
            return {
                (int(r), str(o)): int(n)
                for r, o, n in zip(data["round"], data["outcome"], data["nodes"], strict=True)
            }
    raise AssertionError("no participation chart on the page")


# --- Audit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("node", ["hospital", "bank"])
def test_audit_page_lists_the_stored_ledger_entries(real_run, db, node, monkeypatch):
    stored = ledger_copy(db, node)
    with transaction(db) as session:
        rows = session.scalars(select(LedgerEntryRow).where(LedgerEntryRow.node == node)).all()
        hashes = {row.seq: row.hash for row in rows}

    app = open_page(real_run.url, "views/audit.py", monkeypatch)
    app.selectbox(key="audit-node").set_value(node).run()

    shown = frames(app)[0]
    assert shown["seq"].tolist() == [e.seq for e in stored]
    assert shown["epsilon_after"].tolist() == [e.epsilon_after for e in stored]
    assert shown["run_id"].tolist() == [real_run.run_id] * len(stored)
    assert shown["hash"].tolist() == [hashes[e.seq] for e in stored]
    assert f"{len(stored)} of {len(stored)} entries shown." in texts(app)


def test_audit_page_verifies_the_copy_and_prepares_files_that_verify(real_run, db, monkeypatch):
    app = open_page(real_run.url, "views/audit.py", monkeypatch)
    app.selectbox(key="audit-node").set_value("hospital").run()

    count = len(ledger_copy(db, "hospital"))

    app.button(key="audit-verify").click().run()
    assert f"hospital's ledger copy verifies: {count} entries" in app.success[0].value
    app.button(key="audit-prepare").click().run()
    files = app.session_state["audit-files"]
    assert files.ok and files.entries == count
    assert f"{count} entries: verified, every epsilon recomputed." in texts(app)


# --- read-only -------------------------------------------------------------------------------


def fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file of the database's folder: its SHA-256 and modification time (ns)."""
    return {
        path.name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.iterdir())
        if path.is_file()
    }


def test_costs_page_shows_what_the_simulated_nodes_measured_and_the_runs_protections(
    real_run, db, monkeypatch
):
    with transaction(db) as session:
        stored = session.scalars(select(NodeCost).where(NodeCost.run_id == real_run.run_id)).all()
        reported = {
            (m.round, m.node_name, m.phase): m.metrics
            for m in session.scalars(select(NodeMetric).where(NodeMetric.run_id == real_run.run_id))
        }
        protections = session.get(Run, real_run.run_id).protections  # type: ignore[union-attr]
    # What each node's reply said is what the coordinator stored, figure by figure.
    for cost in stored:
        sent = reported[(cost.round, cost.node_name, cost.phase)]
        assert cost.evaluate_tokens == sent["evaluate-tokens"]
        assert cost.wall_seconds == pytest.approx(sent["node-seconds"])
        if cost.phase == "train":
            assert cost.train_tokens == sent["train-tokens"] > 0
            assert 0 < cost.train_device_seconds < cost.wall_seconds
    assert {(c.round, c.node_name) for c in stored if c.phase == "train"} == {
        (1, "hospital"),
        (1, "bank"),
        (2, "hospital"),  # the bank declined round 2 at its cap: no train reply, no cost
    }

    app = open_page(real_run.url, "views/costs.py", monkeypatch)

    shown = frames(app)[0].set_index(["round", "node"])
    for (number, node), group in pd.DataFrame(
        [(c.round, c.node_name, c.train_tokens or 0, c.evaluate_tokens or 0) for c in stored],
        columns=["round", "node", "train", "evaluate"],
    ).groupby(["round", "node"]):
        assert shown.loc[(number, node), "tokens read"] == group[["train", "evaluate"]].sum().sum()
    table = app.table[0].value
    assert protections["mode"] == "simulation"
    assert table.loc["secure aggregation", "state"] == "off"  # a simulation averages in clear
    assert table.loc["TLS", "state"] == "not applicable"
    assert table.loc["metric release", "what the run's records show"] == (
        "bank: plain, hospital: plain"
    )


def test_showing_every_page_leaves_the_database_file_unchanged(real_run, monkeypatch):
    before = fingerprint(real_run.path.parent)

    for page in PAGES:
        app = open_page(real_run.url, page, monkeypatch)
        if page == "views/audit.py":
            app.button(key="audit-verify").click().run()
            app.button(key="audit-prepare").click().run()
            assert not app.exception

    assert fingerprint(real_run.path.parent) == before
    assert real_run.path.name in before
