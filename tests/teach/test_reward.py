"""The teaching reward: every outcome, length, the applied degrade penalty, the log-prob term."""

from __future__ import annotations

import pytest

from localforge.errors import ConfigError
from localforge.teach.reward import RewardConfig, outcome, teaching_reward

CFG = RewardConfig()  # improvement 1, penalty 2x, length cost 0.2 at 200 tokens


def test_outcomes():
    assert outcome(False, True) == "improve"
    assert outcome(True, False) == "degrade"
    assert outcome(True, True) == "same-correct"
    assert outcome(False, False) == "same-wrong"


def test_degrade_is_negative_and_costs_the_penalty_times_an_improvement():
    assert teaching_reward(True, False, 0) == pytest.approx(-2.0)
    assert teaching_reward(True, False, 100) == pytest.approx(-2.1)
    assert teaching_reward(True, False, 100) < 0


def test_the_penalty_multiplier_is_applied():
    two = teaching_reward(True, False, 50, config=RewardConfig(degradation_penalty=2.0))
    three = teaching_reward(True, False, 50, config=RewardConfig(degradation_penalty=3.0))
    assert three == pytest.approx(two - 1.0)
    # an improvement does not depend on the penalty
    assert teaching_reward(False, True, 50, config=RewardConfig(degradation_penalty=3.0)) == \
        teaching_reward(False, True, 50, config=RewardConfig(degradation_penalty=2.0))
    # asymmetric: a degrade costs more than an improvement earns
    assert abs(teaching_reward(True, False, 0)) > teaching_reward(False, True, 0)


def test_improve_is_positive():
    assert teaching_reward(False, True, 0) == pytest.approx(1.0)
    assert teaching_reward(False, True, 100) == pytest.approx(0.9)
    assert teaching_reward(False, True, 10_000) == pytest.approx(0.8)  # the cost stops at the budget


def test_same_correct_and_same_wrong_are_zero_without_teaching_and_below_with_it():
    assert teaching_reward(True, True, 0) == 0.0
    assert teaching_reward(False, False, 0) == 0.0
    assert teaching_reward(True, True, 200) == pytest.approx(-0.2)
    assert teaching_reward(False, False, 100) == pytest.approx(-0.1)


@pytest.mark.parametrize(("without", "with_"), [(False, True), (True, True), (False, False), (True, False)])
def test_shorter_teaching_scores_higher_in_every_outcome(without, with_):
    short = teaching_reward(without, with_, 20)
    long = teaching_reward(without, with_, 180)
    assert short > long


def test_improvement_beats_every_non_improvement_at_any_length():
    worst_improve = teaching_reward(False, True, 10_000, logprob_gain=-5, config=RewardConfig(logprob_weight=0.3))
    best_same = teaching_reward(True, True, 0, logprob_gain=5, config=RewardConfig(logprob_weight=0.3))
    assert worst_improve > 0
    assert worst_improve > teaching_reward(True, False, 0)
    assert best_same < 1.0


def test_logprob_gain_shapes_but_never_lifts_a_degrade():
    cfg = RewardConfig(logprob_weight=0.5)
    assert teaching_reward(False, False, 0, logprob_gain=0.4, config=cfg) == pytest.approx(0.2)
    assert teaching_reward(False, False, 0, logprob_gain=-0.4, config=cfg) == pytest.approx(-0.2)
    assert teaching_reward(False, False, 0, logprob_gain=9.0, config=cfg) == pytest.approx(0.5)  # clipped
    assert teaching_reward(True, False, 0, logprob_gain=9.0, config=cfg) == pytest.approx(-2.0)
    assert teaching_reward(False, False, 0, logprob_gain=0.4) == 0.0  # weight 0 by default


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"improvement": 0}, "improvement"),
    ({"degradation_penalty": 0.5}, "degradation_penalty"),
    ({"length_cost": -0.1}, "length_cost"),
    ({"length_cost": 0.7, "logprob_weight": 0.3}, "length_cost + logprob_weight"),
    ({"token_budget": 0}, "token_budget"),
    ({"token_budget": 1.5}, "token_budget"),
    ({"improvement": float("nan")}, "improvement"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as exc:
        RewardConfig(**kwargs)
    assert field in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("tokens", [-1, 1.5, True])
def test_bad_token_count(tokens):
    with pytest.raises(ConfigError, match="teaching_tokens"):
        teaching_reward(False, True, tokens)
