import pytest

from fedtune.privacy.accounting import BudgetExhaustedError, calibrate_noise_multiplier, epsilon_of


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_ends_the_plan_at_the_target(accountant):
    sigma = calibrate_noise_multiplier(
        target_epsilon=8.0, delta=1e-5, sample_rate=0.05, steps=200, accountant=accountant
    )

    spent = epsilon_of([(sigma, 0.05, 200)], delta=1e-5, accountant=accountant)
    assert 8.0 - 0.02 <= spent <= 8.0


def test_recalibrating_each_round_keeps_the_noise_of_the_plan():
    plan = dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.1, accountant="rdp")
    sigma = calibrate_noise_multiplier(steps=4 * 25, **plan)

    again = calibrate_noise_multiplier(steps=3 * 25, history=[(sigma, 0.1, 25)], **plan)

    assert again == pytest.approx(sigma, rel=0.01)


def test_a_spent_budget_is_refused():
    history = [(0.5, 0.5, 100)]

    with pytest.raises(BudgetExhaustedError, match="already spent"):
        calibrate_noise_multiplier(
            target_epsilon=1.0,
            delta=1e-5,
            sample_rate=0.1,
            steps=10,
            accountant="rdp",
            history=history,
        )


def test_opacus_rdp_matches_the_known_value():
    # Measured with Opacus and Google's dp-accounting alike: q=0.01, sigma=1, 1000 steps.
    assert epsilon_of([(1.0, 0.01, 1000)], delta=1e-5, accountant="rdp") == pytest.approx(
        2.1014, abs=1e-3
    )
