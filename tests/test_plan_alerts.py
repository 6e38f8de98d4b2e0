"""Budget alerts against the node's plan: a node on its planned trajectory is not alarmed as
it nears its cap (the plan ends there); a node ahead of plan is."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from conftest import FederatedRun
from fedtune.client_node.local_round import planned_epsilon
from fedtune.common.database import transaction
from fedtune.coordinator.health import budget_alerts
from fedtune.platform.config import PrivacySettings
from fedtune.platform.db.storage import HealthAlert, open_database
from fedtune.privacy.accounting import epsilon_of
from fedtune.privacy.planner import make_plan


def test_on_plan_near_the_cap_is_not_an_alarm():
    plan = make_plan(800, epsilon=8.0, delta=1e-5, rounds=3)  # 5.8, 7.0, 8.0: 88% at round 2
    on_plan = {"hospital": (plan.epsilon_after[2], 8.0, plan.epsilon_after[2])}

    assert budget_alerts(on_plan) == []


def test_ahead_of_plan_is_an_alarm_and_so_is_near_the_cap_then():
    alerts = budget_alerts({"bank": (7.3, 8.0, 5.8)})

    assert [a.kind for a in alerts] == ["ahead-of-plan", "near-cap"]
    assert "its plan expected 5.80" in alerts[0].message


def test_without_a_plan_the_cap_share_alone_decides():
    assert [a.kind for a in budget_alerts({"old-node": (7.3, 8.0, None)})] == ["near-cap"]
    assert budget_alerts({"old-node": (3.0, 8.0, None)}) == []


def test_a_node_calibrating_to_its_target_is_on_its_plan():
    privacy = PrivacySettings(target_epsilon=8.0, delta=1e-5, planned_rounds=3)
    before = [(1.5, 0.05, 40)]  # an earlier run on the same data set
    plan = make_plan(800, epsilon=8.0, delta=1e-5, rounds=3, batch_size=40, history=before)

    planned = [
        planned_epsilon(
            privacy,
            before_run=before,
            sample_rate=plan.sample_rate,
            steps=plan.steps_per_round,
            rounds_done=done,
        )
        for done in (1, 2, 3)
    ]

    assert planned == pytest.approx(list(plan.epsilon_after), abs=0.02)
    assert planned[-1] <= 8.0
    fixed_low_noise = epsilon_of(
        [*before, (plan.noise_multiplier * 0.7, plan.sample_rate, plan.steps_per_round)],
        delta=1e-5,
        accountant="rdp",
    )
    assert fixed_low_noise > planned[0] * 1.01  # less noise than planned: ahead


@pytest.mark.simulation
def test_a_federated_run_on_plan_raises_no_budget_alarm(federated_run: FederatedRun):
    engine = open_database(federated_run.url, create=False)
    with transaction(engine) as session:
        kinds = [
            (a.node_name, a.kind)
            for a in session.scalars(
                select(HealthAlert).where(HealthAlert.run_id == federated_run.run_id)
            )
        ]
    engine.dispose()

    assert ("hospital", "near-cap") not in kinds  # it ends at its cap, as planned
    assert not [kind for _, kind in kinds if kind == "ahead-of-plan"]
