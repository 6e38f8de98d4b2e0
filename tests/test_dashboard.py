"""The coordinator dashboard: each page against a real coordinator database (Streamlit's
AppTest), its read-only guarantee, and the real server answering on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError
from streamlit.testing.v1 import AppTest

from dashboard_data import (
    BUDGET_REASON,
    CAPS,
    PLAIN_RUN_ID,
    RUN_ID,
    SECURE_AGGREGATION,
    STARTED,
    TIMEOUT,
    CoordinatorData,
    add_budget_group,
    add_copy_with_a_gap,
    add_long_copy,
    add_plain_aggregation_run,
    append_to_copy,
    build_coordinator_database,
    chart_data,
    chart_specs,
    frames,
    insert_forged_entry,
    open_page,
    texts,
)
from fedtune.common.database import transaction
from fedtune.dashboard import common
from fedtune.dashboard.database import DashboardError, check_database, open_read_only
from fedtune.dashboard.launch import APP
from fedtune.dashboard.ledger_checks import AuditFiles
from fedtune.platform.db.migrations import alembic_config
from fedtune.platform.db.storage import HealthAlert, HealthSignal, open_database
from fedtune.privacy.ledger_copies import check_copy
from fedtune.privacy.ledger_file import verify_ledger_file


def migrate(url: str, revision: str) -> None:
    """``alembic downgrade REVISION`` on ``url``, as an admin's older database would be."""
    engine = open_database(url, create=False)
    with engine.begin() as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
    engine.dispose()


def database_snapshot(url: str) -> dict[str, list[tuple]]:
    """Every row of every table, to show that nothing changed."""
    engine = open_database(url, create=False)
    with engine.connect() as connection:
        snapshot = {
            name: sorted(map(tuple, connection.execute(text(f"SELECT * FROM {name}"))), key=repr)
            for name in sorted(inspect(connection).get_table_names())
        }
    engine.dispose()
    return snapshot


@pytest.fixture
def coordinator(tmp_path: Path, database_url: str) -> CoordinatorData:
    """The coordinator's database, on SQLite and on PostgreSQL."""
    return build_coordinator_database(tmp_path, url=database_url)


# --- Overview --------------------------------------------------------------------------------


def test_overview_lists_the_run_with_its_state_rounds_nodes_and_loss(coordinator, monkeypatch):
    app = open_page(coordinator.url, None, monkeypatch)

    runs = frames(app)[0]
    assert runs.loc[0, ["run", "state", "rounds done", "nodes"]].tolist() == [
        RUN_ID,
        "finished",
        "3 / 3",
        2,
    ]
    assert runs.loc[0, "node names"] == "bank, hospital"
    assert runs.loc[0, "global held-out loss"] == pytest.approx(2.70)


def test_overview_shows_the_alerts_with_their_reasons(coordinator, monkeypatch):
    app = open_page(coordinator.url, None, monkeypatch)

    alerts = frames(app)[1]
    assert set(alerts["kind"]) == {"declined", "near-cap"}
    assert BUDGET_REASON in " ".join(alerts["reason"])


# --- Privacy budget --------------------------------------------------------------------------


def test_privacy_page_shows_each_nodes_epsilon_against_its_cap_and_what_remains(
    coordinator, monkeypatch
):
    app = open_page(coordinator.url, "views/privacy.py", monkeypatch)

    shown = {metric.label: (metric.value, metric.proto.delta) for metric in app.metric}
    bank = coordinator.epsilons["bank"][-1]
    assert shown["bank · d2d2d2d2"] == (
        f"ε {bank:.3f} of {CAPS['bank']:g}",
        f"{CAPS['bank'] - bank:.3f} left",
    )
    table = frames(app)[0].set_index("node")
    assert table.loc["hospital", "remaining"] == pytest.approx(
        CAPS["hospital"] - coordinator.epsilons["hospital"][-1]
    )
    assert table.loc["hospital", "delta"] == 1e-5
    assert table.loc["hospital", "accountant"] == "rdp"  # the signed entry's own words


def test_privacy_page_counts_a_budget_group_as_the_nodes_guard_does(coordinator, monkeypatch):
    combined = add_budget_group(coordinator)

    app = open_page(coordinator.url, "views/privacy.py", monkeypatch)

    assert "Budget groups" in [header.value for header in app.subheader]
    groups = next(f for f in frames(app) if "combined epsilon" in f.columns)
    [row] = groups.to_dict("records")
    assert row["node"] == "hospital" and row["data sets"] == "2a2a2a2a, 3b3b3b3b"
    # Three SFT rounds and one DPO round on the same people: one epsilon of four rounds,
    # more than either data set's own (three rounds, one round).
    assert row["combined epsilon"] == pytest.approx(combined)
    assert row["node's count"] == pytest.approx(combined)
    assert combined > coordinator.epsilons["hospital"][-1]
    assert row["private rounds"] == 4 and row["cap"] == CAPS["hospital"]
    assert row["remaining"] == pytest.approx(CAPS["hospital"] - combined)


def test_privacy_page_without_budget_groups_shows_none(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/privacy.py", monkeypatch)

    assert "Budget groups" not in [header.value for header in app.subheader]


def test_privacy_chart_draws_each_cap_as_a_dashed_line(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/privacy.py", monkeypatch)

    layers = chart_specs(app)[0]["layer"]
    cap_layers = [layer for layer in layers if layer["encoding"]["y"]["field"] == "epsilon_cap"]
    assert len(cap_layers) == 1 and cap_layers[0]["mark"]["strokeDash"]
    data = chart_data(app)
    assert dict(zip(data["node_name"], data["epsilon_cap"], strict=True)) == CAPS
    assert sorted(data.loc[data["node_name"] == "bank", "epsilon_after"]) == pytest.approx(
        coordinator.epsilons["bank"]
    )


def test_privacy_page_lists_the_round_declined_for_lack_of_budget(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/privacy.py", monkeypatch)

    declined = frames(app)[1]
    assert declined[["round", "node", "reason"]].values.tolist() == [[3, "bank", BUDGET_REASON]]


def test_privacy_page_lists_a_node_ahead_of_its_plan_and_not_one_on_it(coordinator, monkeypatch):
    on_plan = open_page(coordinator.url, "views/privacy.py", monkeypatch)
    assert "No node has spent ahead of its plan." in texts(on_plan)
    message = "hospital has spent epsilon 7.30, its plan expected 5.80 by this round"
    engine = open_database(coordinator.url, create=False)
    with transaction(engine) as session:
        session.add(
            HealthAlert(
                run_id=RUN_ID, round=1, node_name="hospital", kind="ahead-of-plan", message=message
            )
        )
    engine.dispose()
    st.cache_data.clear()  # the page caches its queries for a few seconds

    ahead = open_page(coordinator.url, "views/privacy.py", monkeypatch)

    listed = [f for f in frames(ahead) if "message" in f.columns]
    assert listed and listed[0][["round", "node", "message"]].values.tolist() == [
        [1, "hospital", message]
    ]


def test_an_intact_ledger_copy_verifies(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/privacy.py", monkeypatch)

    copies = frames(app)[2].set_index("node")
    assert copies["verdict"].tolist() == ["✅ verifies", "✅ verifies"]
    assert copies.loc["hospital", "entries"] == 3
    assert not app.error


def test_a_copy_missing_an_entry_the_node_spent_alone_is_incomplete_not_failed(coordinator):
    add_copy_with_a_gap(coordinator, "clinic")

    check = check_copy(open_read_only(coordinator.url), "clinic")

    assert check.verdict == "incomplete"
    assert "seq 2 never reached the coordinator" in check.message


def test_a_ledger_copy_with_a_forged_entry_fails_verification(coordinator, monkeypatch):
    forged = insert_forged_entry(coordinator, "bank")

    app = open_page(coordinator.url, "views/privacy.py", monkeypatch)

    copies = frames(app)[2].set_index("node")
    assert copies.loc["bank", "verdict"] == "❌ fails"
    assert copies.loc["hospital", "verdict"] == "✅ verifies"
    assert f"entry seq {forged.seq}: signature does not match" in copies.loc["bank", "detail"]
    assert "ledger copy of bank does not verify" in app.error[0].value


# --- A/B tests -------------------------------------------------------------------------------


def test_ab_page_shows_the_verdict_difference_and_confidence_interval(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/ab_tests.py", monkeypatch)

    overall = frames(app)[0].set_index("metric")
    assert overall.loc["loss", "verdict"] == "b better"
    assert overall.loc["loss", "confidence interval"] == "95%: [-0.41, -0.17]"
    assert overall.loc["loss", "p-value"] == pytest.approx(4e-5)
    assert overall.loc["exact-match", "verdict"] == "no significant difference"
    assert "**loss** (lower is better): **b better** — B − A = -0.29" in texts(app)


def test_ab_page_breaks_the_results_down_per_node_and_plots_error_bars(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/ab_tests.py", monkeypatch)

    per_node = frames(app)[1]
    assert sorted(per_node["node"]) == ["bank", "hospital"]
    layers = chart_specs(app)[0]["spec"]["layer"]
    error_bars = [layer for layer in layers if layer["encoding"].get("x2")]
    assert error_bars[0]["encoding"]["x"]["field"] == "ci_low"
    assert error_bars[0]["encoding"]["x2"]["field"] == "ci_high"


def test_ab_page_says_so_when_there_are_no_tests(tmp_path, monkeypatch):
    data = build_coordinator_database(tmp_path, ab_tests=False)

    app = open_page(data.url, "views/ab_tests.py", monkeypatch)

    assert "No A/B tests yet." in app.info[0].value
    assert not app.dataframe


# --- Model health ----------------------------------------------------------------------------


def test_health_page_names_why_a_signal_is_unavailable(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/health.py", monkeypatch)

    notes = [info.value for info in app.info]
    assert f"update-norm unavailable (rounds 1-3; bank, hospital): {SECURE_AGGREGATION}" in notes


def test_health_page_plots_losses_per_node_and_global(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/health.py", monkeypatch)

    losses = chart_data(app, 0)
    assert set(losses["who"]) == {"global", "hospital", "bank"}
    assert set(losses["kind"]) == {"train", "held-out"}
    global_held_out = losses[(losses["who"] == "global") & (losses["kind"] == "held-out")]
    assert global_held_out["value"].tolist() == pytest.approx([2.85, 2.75, 2.70])


def test_health_page_shows_participation_per_round(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/health.py", monkeypatch)

    outcomes = next(f for f in frames(app) if 3 in f.columns)
    assert outcomes.loc["bank"].tolist() == ["accepted", "accepted", "declined"]
    assert outcomes.loc["hospital"].tolist() == ["accepted"] * 3


def test_health_page_flags_an_outlier_update_on_its_norm_chart(coordinator, monkeypatch):
    add_plain_aggregation_run(coordinator)

    app = open_page(coordinator.url, "views/health.py", monkeypatch)

    assert app.selectbox(key="health-run").value == PLAIN_RUN_ID  # the newest run
    norms = chart_data(app, 1)
    flagged = norms[norms["flagged"]]
    assert flagged[["who", "round", "value"]].values.tolist() == [["hospital", 2, 6.0]]
    assert "Outlier update: hospital in round 2." in texts(app)


def test_health_page_draws_preference_accuracy_and_margin_of_a_dpo_run(coordinator, monkeypatch):
    accuracy = {None: [0.0, 0.6, 0.7], "hospital": [0.0, 0.5, 0.75], "bank": [0.0, 0.7, 0.65]}
    engine = open_database(coordinator.url, create=False)
    with transaction(engine) as session:
        for node, values in accuracy.items():
            for number, value in enumerate(values, start=1):
                session.add_all(
                    HealthSignal(
                        run_id=RUN_ID, round=number, node_name=node, signal=signal, value=value
                    )
                    for signal in ("preference-accuracy", "reward-margin")
                )
    engine.dispose()

    app = open_page(coordinator.url, "views/health.py", monkeypatch)

    assert "Preferences" in [header.value for header in app.subheader]
    drawn = chart_data(app, 1)  # after the loss curves
    global_accuracy = drawn[drawn["who"] == "global"].sort_values("round")
    assert global_accuracy["value"].tolist() == pytest.approx([0.0, 0.6, 0.7])
    assert set(drawn["who"]) == {"global", "hospital", "bank"}


def test_health_page_of_a_run_without_preference_pairs_has_no_preference_section(
    coordinator, monkeypatch
):
    app = open_page(coordinator.url, "views/health.py", monkeypatch)

    assert "Preferences" not in [header.value for header in app.subheader]


# --- Audit -----------------------------------------------------------------------------------


def test_audit_page_lists_a_nodes_entries_and_filters_them_by_run(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/audit.py", monkeypatch)
    app.selectbox(key="audit-node").set_value("hospital").run()

    app.multiselect(key="audit-runs").set_value([RUN_ID]).run()

    entries = frames(app)[0]
    assert entries["seq"].tolist() == [1, 2, 3]
    assert "3 of 3 entries shown." in texts(app)


def test_audit_verify_button_says_an_intact_copy_verifies(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/audit.py", monkeypatch)

    app.button(key="audit-verify").click().run()

    assert "bank's ledger copy verifies: 2 entries" in app.success[0].value


def test_audit_files_hold_a_ledger_that_verifies_offline_and_a_report(
    coordinator, monkeypatch, tmp_path
):
    app = open_page(coordinator.url, "views/audit.py", monkeypatch)

    app.button(key="audit-prepare").click().run()

    files = app.session_state["audit-files"]
    assert isinstance(files, AuditFiles) and files.ok
    assert [button.label for button in app.download_button] == [
        "Ledger (JSONL)",
        "Audit report (HTML)",
    ]
    exported = tmp_path / files.jsonl_name
    exported.write_bytes(files.jsonl)
    result = verify_ledger_file(exported, public_key=coordinator.keys["bank"].public_key)
    assert result.ok and result.summary["entries"] == 2
    assert files.html.startswith(b"<!DOCTYPE html>")


def test_audit_page_shows_what_leaves_a_node_for_the_chosen_settings(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/audit.py", monkeypatch)

    shown = pd.concat(frames(app)[1:], ignore_index=True)  # the entries' table comes first
    app.selectbox(key="egress-release-metrics").set_value("none").run()
    restricted = pd.concat(frames(app)[1:], ignore_index=True)

    assert "What leaves a node" in [header.value for header in app.subheader]
    labels = [expander.label for expander in app.expander]
    assert "train — SecAgg+ stage collect_masked_vectors" in labels
    assert "Sent by Flower beside the replies" in labels
    loss = shown[shown["field"] == "train-loss"]
    assert set(loss["protection"]) == {"plain"}  # inside the SecAgg+ reply, in the clear
    assert "fitres.metrics.fedtune-reply > metrics" in set(loss["record"])
    assert set(restricted[restricted["field"] == "train-loss"]["protection"]) == {"not-sent"}
    assert "clientapp_runtime" in set(restricted["field"])


def test_audit_page_shows_a_long_copy_a_page_at_a_time(coordinator, monkeypatch):
    add_long_copy(coordinator, "registry", 1_203)
    app = open_page(coordinator.url, "views/audit.py", monkeypatch)

    app.selectbox(key="audit-node").set_value("registry").run()

    assert frames(app)[0]["seq"].tolist() == list(range(1, 501))
    assert "Entries 1–500 of 1,203 shown (page 1 of 3, 500 a page)." in texts(app)
    app.number_input(key="audit-page").set_value(3).run()
    assert frames(app)[0]["seq"].tolist() == list(range(1001, 1204))
    assert "Entries 1,001–1,203 of 1,203 shown (page 3 of 3, 500 a page)." in texts(app)


def test_audit_date_filter_is_applied_by_the_database_and_starts_at_page_one(
    coordinator, monkeypatch
):
    add_long_copy(coordinator, "registry", 1_203)  # one entry an hour from STARTED
    app = open_page(coordinator.url, "views/audit.py", monkeypatch)
    app.selectbox(key="audit-node").set_value("registry").run()
    app.number_input(key="audit-page").set_value(3).run()
    day = STARTED.date() + timedelta(days=2)

    app.date_input(key="audit-dates").set_value((day, day)).run()

    entries = frames(app)[0]
    hours = [STARTED + timedelta(hours=seq - 1) for seq in range(1, 1_204)]
    assert entries["seq"].tolist() == [n for n, t in enumerate(hours, 1) if t.date() == day]
    assert {t.date() for t in entries["recorded_at"]} == {day}
    assert "24 of 1,203 entries shown." in texts(app)
    app.date_input(key="audit-dates").set_value((STARTED.date(), hours[-1].date())).run()
    assert app.number_input(key="audit-page").value == 1


def test_another_nodes_filters_do_not_carry_over(coordinator, monkeypatch):
    add_long_copy(coordinator, "registry", 30)
    app = open_page(coordinator.url, "views/audit.py", monkeypatch)
    app.multiselect(key="audit-runs").set_value([RUN_ID]).run()

    app.selectbox(key="audit-node").set_value("registry").run()

    assert app.multiselect(key="audit-runs").value == []
    assert "30 of 30 entries shown." in texts(app)


def test_a_long_copy_is_verified_on_request_and_its_verdict_kept_until_it_grows(
    coordinator, monkeypatch
):
    monkeypatch.setattr(common, "VERIFY_ON_SIGHT_ENTRIES", 100)
    key = add_long_copy(coordinator, "registry", 150)

    first = open_page(coordinator.url, "views/privacy.py", monkeypatch)
    copies = frames(first)[2].set_index("node")
    assert copies.loc["registry", "verdict"] == "⏳ not verified yet"
    assert copies.loc["bank", "verdict"] == "✅ verifies"  # short copies: verified at once
    first.button(key="privacy-verify").click().run()
    assert frames(first)[2].set_index("node").loc["registry", "verdict"] == "✅ verifies"

    later = open_page(coordinator.url, "views/privacy.py", monkeypatch)  # another visitor
    assert frames(later)[2].set_index("node").loc["registry", "verdict"] == "✅ verifies"
    assert "Verify registry's ledger copy again (150 entries)" in later.button[0].label

    append_to_copy(coordinator, "registry", key)
    st.cache_data.clear()
    grown = open_page(coordinator.url, "views/privacy.py", monkeypatch)
    copies = frames(grown)[2].set_index("node")
    assert copies.loc["registry", ["entries", "verdict"]].tolist() == [151, "⏳ not verified yet"]


# --- Protections and costs ------------------------------------------------------------------


def stored_costs(url: str) -> pd.DataFrame:
    """The node_costs rows as the database holds them, summed per round and node."""
    engine = open_database(url, create=False)
    with engine.connect() as connection:
        rows = pd.read_sql(text("SELECT * FROM node_costs"), connection)
    engine.dispose()
    figures = [
        "train_tokens",
        "evaluate_tokens",
        "train_device_seconds",
        "evaluate_device_seconds",
        "wall_seconds",
    ]
    summed = rows.groupby(["round", "node_name"])[figures].sum().reset_index()
    summed["tokens"] = summed["train_tokens"] + summed["evaluate_tokens"]
    return summed


def test_costs_page_shows_each_node_rounds_cost_as_the_database_holds_it(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/costs.py", monkeypatch)

    shown = frames(app)[0].set_index(["round", "node"]).sort_index()
    stored = stored_costs(coordinator.url).set_index(["round", "node_name"]).sort_index()
    assert (
        list(shown.index)
        == list(stored.index)
        == [
            (1, "bank"),
            (1, "hospital"),
            (2, "bank"),
            (2, "hospital"),
            (3, "hospital"),  # the bank declined round 3: no cost
        ]
    )
    for column, figure in [
        ("tokens read", "tokens"),
        ("training tokens", "train_tokens"),
        ("evaluation tokens", "evaluate_tokens"),
        ("training device-s", "train_device_seconds"),
        ("evaluation device-s", "evaluate_device_seconds"),
        ("wall s", "wall_seconds"),
    ]:
        assert shown[column].tolist() == pytest.approx(stored[figure].tolist()), column
    totals = {metric.label: metric.value for metric in app.metric}
    assert totals["Tokens read"] == f"{stored['tokens'].sum():,.0f}"
    assert totals["Training device-seconds"] == f"{stored['train_device_seconds'].sum():,.1f}"
    assert totals["Node wall seconds"] == f"{stored['wall_seconds'].sum():,.1f}"


def test_costs_chart_draws_each_nodes_device_seconds_per_round(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/costs.py", monkeypatch)

    data = chart_data(app)
    stored = stored_costs(coordinator.url)
    drawn = data.pivot_table(index=["round", "node_name"], columns="compute", values="seconds")
    expected = stored.set_index(["round", "node_name"])
    assert drawn["training"].sort_index().tolist() == pytest.approx(
        expected["train_device_seconds"].sort_index().tolist()
    )
    assert drawn["evaluation"].sort_index().tolist() == pytest.approx(
        expected["evaluate_device_seconds"].sort_index().tolist()
    )
    assert chart_specs(app)[0]["mark"]["type"] == "bar"


def test_protections_are_those_the_run_recorded_and_its_records_show(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/costs.py", monkeypatch)

    table = app.table[0].value
    assert table.loc["TLS", "state"] == "on"
    assert "sha256:c4c4" in table.loc["TLS", "as recorded when the run started"]
    assert table.loc["node authentication", "state"] == "on"
    assert table.loc["secure aggregation", "state"] == "on"
    node_level = table.loc["node-level DP (coordinator)"]
    assert node_level["state"] == "on" and "noise multiplier 1.2" in node_level.iloc[1]
    assert f"ε {coordinator.node_level[-1]:.3f} after round 3" in node_level.iloc[2]
    example = table.loc["example-level DP (DP-SGD, each node)", "what the run's records show"]
    assert f"hospital: ε {coordinator.epsilons['hospital'][-1]:.3f}" in example
    assert f"bank: ε {coordinator.epsilons['bank'][-1]:.3f}" in example
    assert table.loc["witness receipts", "what the run's records show"].startswith(
        "3 of 5 ledger entries"  # the hospital's three were countersigned, the bank's two not
    )
    assert (
        table.loc["metric release", "what the run's records show"] == "bank: plain, hospital: plain"
    )
    assert table.loc["checkpoint encryption", "state"] == "off"


def test_a_run_that_recorded_no_protections_says_so_and_shows_its_records(coordinator, monkeypatch):
    add_plain_aggregation_run(coordinator)
    app = open_page(coordinator.url, "views/costs.py", monkeypatch)

    app.selectbox(key="costs-run").set_value(PLAIN_RUN_ID).run()

    assert "did not record its protections" in texts(app)
    table = app.table[0].value
    assert set(table["state"]) == {"not recorded"}
    assert "No cost figures for this run." in texts(app)


def test_privacy_page_shows_node_level_epsilon_beside_each_nodes_own(coordinator, monkeypatch):
    app = open_page(coordinator.url, "views/privacy.py", monkeypatch)

    both = next(f for f in frames(app) if "ε per node (coordinator's ledger)" in f.columns)
    both = both.set_index("node")
    for node, epsilons in coordinator.epsilons.items():
        assert both.loc[node, "ε per example (node's own ledger)"] == pytest.approx(epsilons[-1])
        assert both.loc[node, "ε per node (coordinator's ledger)"] == pytest.approx(
            coordinator.node_level[-1]
        )
    assert set(both["δ (node)"]) == {1e-5}


# --- absent data -----------------------------------------------------------------------------

PAGES = [
    None,
    "views/privacy.py",
    "views/ab_tests.py",
    "views/health.py",
    "views/audit.py",
    "views/costs.py",
]


@pytest.mark.parametrize("page", PAGES)
def test_an_empty_database_gives_a_clear_note_on_every_page(tmp_path, monkeypatch, page):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    open_database(url, create=True).dispose()

    app = open_page(url, page, monkeypatch)

    assert app.info, texts(app)
    assert not app.error


@pytest.mark.parametrize("page", PAGES)
def test_a_database_behind_the_newest_migration_is_refused_and_left_as_it_is(
    coordinator, monkeypatch, page
):
    migrate(coordinator.url, "0003")  # before the one privacy record
    before = database_snapshot(coordinator.url)

    app = open_page(coordinator.url, page, monkeypatch)

    assert len(app.error) == 1
    message = app.error[0].value
    assert "at revision '0003'" in message and "behind" in message
    assert "`fedtune db upgrade --database" in message
    assert database_snapshot(coordinator.url) == before  # the dashboard changed nothing


def test_a_database_made_before_migrations_is_refused_with_the_upgrade_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = open_database(url, create=False)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE runs (id VARCHAR(64) PRIMARY KEY)"))
    engine.dispose()

    with pytest.raises(DashboardError, match=r"made before migrations.*fedtune db upgrade"):
        check_database(url)


def test_a_database_of_a_newer_fedtune_is_refused_saying_so(coordinator):
    engine = open_database(coordinator.url, create=False)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()

    with pytest.raises(DashboardError, match=r"revision '9999'.*newer fedtune"):
        check_database(coordinator.url)


def test_the_database_comes_from_the_db_argument_after_the_double_dash(coordinator, monkeypatch):
    monkeypatch.delenv(common.ENV_VAR, raising=False)
    monkeypatch.setattr(sys, "argv", [str(APP), "--db", coordinator.url])

    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()

    assert not app.exception and not app.error
    assert frames(app)[0].loc[0, "run"] == RUN_ID


def test_without_a_database_the_app_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv(common.ENV_VAR, raising=False)
    monkeypatch.setattr(sys, "argv", [str(APP)])

    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()

    assert "fedtune dashboard --db URL" in app.error[0].value


def test_a_file_that_is_not_a_fedtune_database_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "other.db"
    open_database(f"sqlite:///{path}", create=False).connect().close()

    with pytest.raises(DashboardError, match="not a fedtune coordinator database"):
        check_database(str(path))


def test_a_missing_database_file_is_named(tmp_path):
    with pytest.raises(DashboardError, match=r"no such database file: .*missing\.db"):
        check_database(f"sqlite:///{tmp_path / 'missing.db'}")


# --- read-only -------------------------------------------------------------------------------


def test_a_write_through_the_dashboards_engine_fails(coordinator):
    engine = common.engine(coordinator.url)

    refused = pytest.raises(DBAPIError, match=r"readonly|read-only")  # SQLite | PostgreSQL
    with refused, engine.begin() as connection:
        connection.execute(text("UPDATE runs SET status = 'failed'"))

    with engine.connect() as connection:
        assert connection.execute(text("SELECT status FROM runs")).scalar_one() == "finished"


def test_a_database_whose_path_has_spaces_and_hashes_opens_read_only(tmp_path):
    folder = tmp_path / "our data #1"
    folder.mkdir()
    data = build_coordinator_database(folder)

    engine = open_read_only(str(data.path))

    with engine.connect() as connection:
        assert connection.execute(text("SELECT id FROM runs")).scalar_one() == RUN_ID


# --- the real server -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _output(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None or process.stdout is None:
        return "no answer from the server"
    return process.stdout.read().decode(errors="replace")


@pytest.mark.e2e
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "term"])
def test_the_dashboard_server_answers_on_loopback_and_stops_on_ctrl_c_or_term(
    coordinator, stop_signal
):
    port = free_port()
    code = (
        # As in a terminal: a test run in the background inherits SIGINT ignored.
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from fedtune.dashboard.launch import run_dashboard; "
        f"sys.exit(run_dashboard({coordinator.url!r}, host='127.0.0.1', port={port}))"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code],
        start_new_session=True,  # its own process group: the test can stop all of it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        health = f"http://127.0.0.1:{port}/_stcore/health"
        deadline, answer = time.monotonic() + TIMEOUT, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    answer = response.read().decode()
            except OSError:
                time.sleep(0.5)
        assert answer == "ok", _output(server)

        server.send_signal(stop_signal)
        assert server.wait(timeout=30) == 0
        with pytest.raises(ProcessLookupError):  # nothing of it is left: Streamlit stopped too
            os.killpg(server.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        assert server.stdout is not None
        server.stdout.close()
