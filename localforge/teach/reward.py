"""The teaching reward (ATLAS-style): did the teacher's guidance help the student, and how cheaply?

A pure function of the comparison ``teach eval`` makes per question: was the student correct
without teaching, correct with it, how many tokens the teaching took, and optionally how much the
teaching raised the student's log-probability of the reference answer. It is the reward for
training teachers with GRPO.

    outcome      improve (wrong -> right)   +improvement
                 same (right -> right, wrong -> wrong)   0
                 degrade (right -> wrong)   -improvement * degradation_penalty   (asymmetric, applied)
    length       - length_cost * min(tokens / token_budget, 1)   (shorter teaching scores higher)
    log-prob     + logprob_weight * clip(gain, -1, 1)            (not for a degrade: it stays a penalty)

The config is checked so that an improvement always scores above 0 and a degrade never does,
whatever the length or the log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from localforge.errors import ConfigError


@dataclass(frozen=True)
class RewardConfig:
    improvement: float = 1.0  # reward for turning a wrong answer right
    degradation_penalty: float = 2.0  # a degrade costs this many times an improvement (ATLAS declares 2x)
    length_cost: float = 0.2  # what teaching as long as the budget costs (< improvement)
    token_budget: int = 200  # teaching tokens at which the length cost is full
    logprob_weight: float = 0.0  # weight of the student's log-prob gain on the reference (nats/token)

    def __post_init__(self) -> None:
        def bad(field: str, want: str, value) -> ConfigError:
            return ConfigError(f"reward {field} must be {want} (got {value!r})")

        for field in ("improvement", "degradation_penalty", "length_cost", "logprob_weight"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise bad(field, "a finite number", value)
        if self.improvement <= 0:
            raise bad("improvement", "above 0", self.improvement)
        if self.degradation_penalty < 1:
            raise bad("degradation_penalty", "at least 1 (a degrade costs at least what an improvement earns)",
                      self.degradation_penalty)
        if self.length_cost < 0 or self.logprob_weight < 0:
            field = "length_cost" if self.length_cost < 0 else "logprob_weight"
            raise bad(field, "0 or more", getattr(self, field))
        if self.length_cost + self.logprob_weight >= self.improvement:
            raise ConfigError(f"reward length_cost + logprob_weight must stay below improvement "
                              f"({self.length_cost} + {self.logprob_weight} >= {self.improvement}), "
                              "or an improvement could score 0 or less")
        if isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int) or self.token_budget < 1:
            raise bad("token_budget", "a whole number of tokens, 1 or more", self.token_budget)


def outcome(correct_without: bool, correct_with: bool) -> str:
    """``improve``, ``degrade``, ``same-correct`` or ``same-wrong``."""
    if correct_with and not correct_without:
        return "improve"
    if correct_without and not correct_with:
        return "degrade"
    return "same-correct" if correct_with else "same-wrong"


def teaching_reward(correct_without: bool, correct_with: bool, teaching_tokens: int,
                    logprob_gain: float | None = None, config: RewardConfig | None = None) -> float:
    """The reward for one teaching (see the module's table). ``teaching_tokens`` is the guidance's
    length in the student's tokens (0 for no guidance); ``logprob_gain`` the mean per-token change in
    the student's log-probability of the reference answer with the guidance (None when unknown)."""
    config = config or RewardConfig()
    if isinstance(teaching_tokens, bool) or not isinstance(teaching_tokens, int) or teaching_tokens < 0:
        raise ConfigError(f"teaching_tokens must be a whole number, 0 or more (got {teaching_tokens!r})")
    if logprob_gain is not None and (isinstance(logprob_gain, bool) or not isinstance(logprob_gain, int | float)
                                     or math.isnan(logprob_gain)):
        raise ConfigError(f"logprob_gain must be a number or None (got {logprob_gain!r})")
    kind = outcome(bool(correct_without), bool(correct_with))
    length = config.length_cost * min(teaching_tokens / config.token_budget, 1.0)
    if kind == "degrade":
        return -config.improvement * config.degradation_penalty - length
    value = (config.improvement if kind == "improve" else 0.0) - length
    if logprob_gain is not None:
        value += config.logprob_weight * max(-1.0, min(1.0, float(logprob_gain)))
    return value
