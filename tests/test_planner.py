"""The privacy planner: its epsilons are an independent accountant's, it never plans past the
target, and bad input gets a one-line error naming the option."""

from __future__ import annotations

import json

import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant

from conftest import PlannedPostgresRun
from fedtune.cli import main
from fedtune.common.database import transaction
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import (
    ConfigError,
    PrivacySettings,
    TrainingSettings,
    load_node_config,
)
from fedtune.platform.db.storage import Run, open_database
from fedtune.privacy.audit.independent_accounting import OPACUS_RDP_ORDERS
from fedtune.privacy.ledger_store import ledger_entries
from fedtune.privacy.planner import PlanError, default_batch_size, make_plan
from fedtune.privacy.training_defaults import DP_LEARNING_RATE, DP_MAX_GRAD_NORM

# RDP at the same orders. At fractional orders dp-accounting sums the series' terms in absolute
# value (conservative; see independent_accounting): the planner's epsilon is at most its, and
# within 2e-3 relative (measured: up to 1.2e-3 at epsilon 8, 5 rounds).
TOLERANCE = 2e-3


@pytest.mark.parametrize(
    ("examples", "epsilon", "rounds"),
    [(800, 8.0, 3), (800, 3.0, 1), (3_200, 8.0, 5), (12_800, 3.0, 10), (50, 1.0, 2)],
)
def test_each_rounds_epsilon_is_google_dp_accountings(examples, epsilon, rounds):
    plan = make_plan(
        examples, epsilon=epsilon, delta=1e-5 if examples > 100 else 1e-3, rounds=rounds
    )

    for done, planned in enumerate(plan.epsilon_after, start=1):
        independent = RdpAccountant(orders=OPACUS_RDP_ORDERS)
        independent.compose(
            SelfComposedDpEvent(
                PoissonSampledDpEvent(plan.sample_rate, GaussianDpEvent(plan.noise_multiplier)),
                plan.steps_per_round * done,
            )
        )
        reference = independent.get_epsilon(plan.delta)
        assert planned == pytest.approx(reference, rel=TOLERANCE)
        assert planned <= reference * (1 + 1e-9)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 3.0, 8.0, 20.0])
@pytest.mark.parametrize("rounds", [1, 4])
def test_a_plan_never_passes_its_target(epsilon, rounds):
    plan = make_plan(1_000, epsilon=epsilon, delta=1e-5, rounds=rounds)
    history = [(1.2, 0.05, 30)]  # the data set spent some before
    later = make_plan(1_000, epsilon=epsilon + 2, delta=1e-5, rounds=rounds, history=history)

    assert plan.epsilon_after[-1] <= epsilon
    assert plan.epsilon_after[-1] >= epsilon - 0.011  # and uses it (calibration tolerance)
    assert later.epsilon_after[-1] <= epsilon + 2
    assert list(plan.epsilon_after) == sorted(plan.epsilon_after)


def test_the_batch_grows_with_the_data():
    assert [default_batch_size(n) for n in (40, 800, 3_200, 12_800, 10**7)] == [
        16,
        64,
        128,
        256,
        1024,
    ]
    assert default_batch_size(10) == 5  # at most half the data


def test_a_target_already_spent_is_refused_naming_the_option():
    with pytest.raises(PlanError, match=r"^--epsilon 1: this data set has already spent"):
        make_plan(1_000, epsilon=1.0, delta=1e-5, history=[(0.5, 0.1, 500)])


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--examples", "10", "--epsilon", "8", "--batch-size", "32"], "--batch-size 32"),
        (["--examples", "100", "--epsilon", "0"], "--epsilon 0"),
        (["--examples", "100", "--epsilon", "-2"], "--epsilon -2"),
        (["--examples", "1000", "--epsilon", "8", "--delta", "0.001"], "--delta 0.001"),
        (["--examples", "0", "--epsilon", "8"], "--examples 0"),
        (["--examples", "100", "--epsilon", "8", "--rounds", "0"], "--rounds 0"),
        (["--epsilon", "8"], "--examples"),
    ],
)
def test_bad_input_gets_one_line_naming_the_option(capsys, argv, named):
    assert main(["privacy", "plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


def test_a_plan_from_a_node_config_reads_n_from_its_data(tmp_path, capsys):
    write_demo_data(tmp_path / "data", domain="hospital", train=120, held_out=10)
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nname = "hospital"\nstate_dir = "state"\n'
        '[data]\ntrain = "data/hospital/train.jsonl"\neval = "data/hospital/held_out.jsonl"\n'
        "[privacy]\ntarget_epsilon = 4.0\ndelta = 1e-4\nplanned_rounds = 2\n"
    )

    assert main(["privacy", "plan", "--config", str(config), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)

    assert (plan["examples"], plan["target_epsilon"], plan["rounds"]) == (120, 4.0, 2)
    assert plan["epsilon_after"][-1] <= 4.0
    assert not (tmp_path / "state").exists()  # planning writes nothing


def test_auto_training_settings_take_the_planners_choice():
    privacy = PrivacySettings(target_epsilon=8.0, delta=1e-5, planned_rounds=3)
    auto = TrainingSettings(steps="auto", batch_size="auto", physical_batch_size=8)
    plan = make_plan(800, epsilon=8.0, delta=1e-5, rounds=3)

    chosen = auto.planned(800, privacy=privacy, rounds=3)

    assert (chosen.batch_size, chosen.steps) == (plan.batch_size, plan.steps_per_round)
    assert TrainingSettings(steps=7).planned(800, privacy=privacy, rounds=3).steps == 7
    fixed_batch = TrainingSettings(steps="auto", batch_size=32).planned(
        800, privacy=privacy, rounds=3
    )
    assert fixed_batch.batch_size == 32


def test_a_misspelt_auto_is_refused_naming_the_key(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nname = "n"\n[data]\ntrain = "t.jsonl"\neval = "e.jsonl"\n'
        '[training]\nsteps = "automatic"\n'
    )
    with pytest.raises(ConfigError, match=r"node.toml: training.steps"):
        load_node_config(config)


@pytest.mark.simulation
def test_a_run_with_auto_training_is_planned_for_its_smallest_node_and_records_it(
    planned_postgres_run: PlannedPostgresRun,
):
    config, run_id, lines = (
        planned_postgres_run.config,
        planned_postgres_run.run_id,
        planned_postgres_run.progress,
    )

    plan = make_plan(32, epsilon=8.0, delta=1e-5, rounds=2)
    engine = open_database(config.database_url, create=False)
    with transaction(engine) as session:
        recorded = session.get(Run, run_id).config["planned_training"]
        entries = ledger_entries(session, "bank")
    engine.dispose()
    assert (recorded["examples"], recorded["batch_size"], recorded["steps"]) == (
        32,
        plan.batch_size,
        plan.steps_per_round,
    )
    assert any("planned training" in line for line in lines)
    assert [e.steps for e in entries] == [plan.steps_per_round] * 2
    assert entries[0].sample_rate == pytest.approx(plan.sample_rate)


def node_config(tmp_path):
    write_demo_data(tmp_path / "data", domain="hospital", train=120, held_out=10)
    config = tmp_path / "node.toml"
    config.write_text(
        "# the operator's comment\n"
        '[node]\nname = "hospital"\nstate_dir = "state"\n'
        '[data]\ntrain = "data/hospital/train.jsonl"\neval = "data/hospital/held_out.jsonl"\n'
        "[training]\nbatch_size = 32\nphysical_batch_size = 32\n"
        "[privacy]\ntarget_epsilon = 4.0\ndelta = 1e-4\nplanned_rounds = 2\n"
    )
    return config


def test_the_plan_prints_the_measured_learning_rate_and_clip(capsys):
    assert main(["privacy", "plan", "--examples", "800", "--epsilon", "8"]) == 0
    out = capsys.readouterr().out

    assert f"learning rate      {DP_LEARNING_RATE:g} (AdamW), clip norm {DP_MAX_GRAD_NORM:g}" in out
    # The configuration's defaults are the measured ones (privacy/training_defaults.py).
    assert TrainingSettings().learning_rate == DP_LEARNING_RATE
    assert PrivacySettings(target_epsilon=8.0).max_grad_norm == DP_MAX_GRAD_NORM


def test_write_puts_the_plan_in_a_new_config_beside_the_original(tmp_path, capsys):
    config = node_config(tmp_path)
    original = config.read_bytes()

    assert main(["privacy", "plan", "--config", str(config), "--write", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)

    assert plan["written"] == str(tmp_path / "node.planned.toml")
    planned = load_node_config(tmp_path / "node.planned.toml")
    assert (planned.training.steps, planned.training.batch_size) == (
        plan["steps_per_round"],
        plan["batch_size"],
    )
    assert planned.training.physical_batch_size == min(32, plan["batch_size"]) < 32
    assert planned.training.learning_rate == plan["learning_rate"] == DP_LEARNING_RATE
    assert planned.privacy.max_grad_norm == plan["max_grad_norm"]
    assert planned.privacy.target_epsilon == 4.0 and planned.node.name == "hospital"
    assert config.read_bytes() == original  # the original, comments and all, stays


def test_write_never_overwrites_and_needs_a_config(tmp_path, capsys):
    config = node_config(tmp_path)
    existing = tmp_path / "node.planned.toml"
    existing.write_text("# mine\n")

    assert main(["privacy", "plan", "--config", str(config), "--write"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err
    assert existing.read_text() == "# mine\n"

    assert main(["privacy", "plan", "--examples", "800", "--epsilon", "8", "--write"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--write needs --config" in err


def test_a_time_budget_cuts_the_passes_and_keeps_the_target():
    full = make_plan(800, epsilon=8.0, delta=1e-5, rounds=3)
    seconds_per_step = 0.33 * full.sample_rate * 800  # the expected Poisson batch
    budget = 20 * seconds_per_step  # room for 6 steps per round, not 13

    cut = make_plan(
        800, epsilon=8.0, delta=1e-5, rounds=3, time_budget_s=budget, seconds_per_example=0.33
    )

    assert cut.steps_per_round == 6 < full.steps_per_round
    assert cut.expected_seconds == pytest.approx(18 * seconds_per_step)
    assert cut.expected_seconds <= budget
    assert cut.epsilon_after[-1] <= 8.0
    assert cut.noise_multiplier < full.noise_multiplier  # fewer steps: less noise per step
    assert any("time budget" in warning for warning in cut.warnings)
    roomy = make_plan(
        800, epsilon=8.0, delta=1e-5, rounds=3, time_budget_s=1e6, seconds_per_example=0.33
    )
    assert roomy.steps_per_round == full.steps_per_round and not roomy.warnings


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--time-budget", "0.1"], "--time-budget"),
        (["--time-budget", "-3"], "--time-budget"),
        (["--time-budget", "30", "--seconds-per-example", "0"], "--seconds-per-example"),
    ],
)
def test_an_impossible_time_budget_gets_one_line(capsys, argv, named):
    assert main(["privacy", "plan", "--examples", "800", "--epsilon", "8", *argv]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err
