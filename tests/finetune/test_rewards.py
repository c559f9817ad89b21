"""The GRPO rewards library on hand-built cases, its checks, and the teaching reward with a real
student (the bundled model on llama.cpp, in process)."""

from __future__ import annotations

import math

import pytest

from localforge.errors import ConfigError
from localforge.finetune.config import RewardSpec
from localforge.finetune.rewards import (
    RewardFailed,
    Rewards,
    Student,
    bind,
    exact_match,
    format,
    json_fields,
    json_valid,
    length,
    needs_fields,
    teaching,
)
from localforge.teach.reward import RewardConfig, teaching_reward

P = ["q"] * 6


def test_exact_match_reads_the_final_number_of_each_side():
    refs = ["She sold 48 + 24 = 72.\n#### 72", "#### 1000", "#### 0.5", "#### 72", "#### -3", "#### 72"]
    completions = ["So the total is 72 clips.", "That makes 1,000 dollars", "#### .5 is wrong, #### 0.50",
                   "It is 27.", "#### -3", "no number here"]
    assert exact_match(P, completions, {"answer": refs}) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    # the number after the last #### wins over later numbers
    assert exact_match(["q"], ["#### 72 (I checked 3 times)"], {"answer": ["#### 72"]}) == [1.0]
    assert exact_match(["q"], ["72"], {"gold": ["#### 72"]}, answer_field="gold") == [1.0]
    with pytest.raises(ValueError, match="no 'answer' field"):
        exact_match(["q"], ["72"], {})


def test_format_length_and_json_rewards():
    assert format(P[:4], ["work\n#### 72", "#### 72 done", "72", "#### 1,200.5 "], {}) == [1.0, 0.0, 0.0, 1.0]
    assert format(["q"], ["<answer>4</answer>"], {}, pattern=r"<answer>\d+</answer>") == [1.0]
    assert length(["q"] * 4, ["x" * 50, "x" * 100, "x" * 150, "x" * 400], {}, target=100) == [1.0, 1.0, 0.5, 0.0]
    assert length(["q"], ["one two three four"], {}, target=2, unit="words") == [0.0]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    got = json_valid(P[:4], ['{"n": 3}', 'Here: ```json\n{"n": "3"}\n```', "[1, 2]", "not json"], {}, schema=schema)
    assert got == [1.0, 0.5, 0.0, 0.0]
    assert json_valid(["q"], ['{"n": 3}'], {"schema": ['{"type": "object", "required": ["m"]}']}) == [0.5]
    ref = {"maker": "Acme", "price": 2000, "ok": True}
    got = json_fields(P[:3], ['{"maker": " acme ", "price": "2,000", "ok": true}', '{"maker": "Acme"}', "nothing"],
                      {"answer": [ref] * 3})
    assert got == [1.0, pytest.approx(1 / 3), 0.0]
    with pytest.raises(ValueError, match="non-empty JSON object"):
        json_fields(["q"], ["{}"], {"answer": ["#### 4"]})


def test_bind_checks_names_and_options_before_any_work():
    for name, options, named in [("exact", {}, "unknown reward 'exact'"),
                                 ("length", {"size": 3}, "has no option 'size'"),
                                 ("length", {"target": 0}, "target"),
                                 ("length", {"unit": "tokens"}, "unit"),
                                 ("format", {"pattern": "("}, "pattern"),
                                 ("teaching", {}, "grpo.student"),
                                 ("teaching", {"degradation_penalty": 0.5}, "degradation_penalty")]:
        with pytest.raises(ConfigError, match="grpo") as exc:
            bind(name, options, student=True if "penalty" in str(options) else None)
        assert named in str(exc.value) and "\n" not in str(exc.value)
    specs = [RewardSpec(name="exact_match", options={"answer_field": "gold"}), RewardSpec(name="format"),
             RewardSpec(name="json_valid", options={"schema": {}}), RewardSpec(name="json_fields")]
    assert needs_fields(specs) == {"gold", "answer"}


def _specs(*names):
    return [RewardSpec(name=n) for n in names]


def test_rewards_score_each_and_name_the_one_that_fails():
    r = Rewards([RewardSpec(name="exact_match"), RewardSpec(name="format", weight=0.5)])
    assert r.names == ["exact_match", "format"] and r.weights == [1.0, 0.5]
    assert r.score(["q", "q"], ["#### 4", "4"], {"answer": ["#### 4"] * 2}) == [[1.0, 1.0], [1.0, 0.0]]
    r.step = 2
    with pytest.raises(RewardFailed) as exc:  # a reward that raises: its name, the step, the reason
        r.score(["q"], ["4"], {})
    assert str(exc.value) == "reward 'exact_match' failed at step 3: ValueError: the rows have no 'answer' field, " \
                             "which exact_match compares against"
    bad = Rewards(_specs("exact_match"))
    for returned, why in [([1.0, 2.0], "returned 2 values for 1 completions"), ([math.nan], "nan"),
                          (["x"], "not numbers")]:
        bad.items[0].fn = lambda p, c, f, _r=returned, **o: _r
        with pytest.raises(RewardFailed, match="reward 'exact_match' failed at step 1") as exc:
            bad.score(["q"], ["c"], {"answer": ["#### 1"]})
        assert why in str(exc.value)


@pytest.mark.slow
def test_teaching_reward_asks_a_real_student_in_batches(llamacpp_backend):
    """The student (SmolLM2-135M on llama.cpp) answers each question once without guidance and once
    per guidance; the reward is teach's teaching_reward of those outcomes."""
    calls = []
    student = Student.of(llamacpp_backend, max_tokens=24)
    real = student.answer

    def counted(conversations, max_tokens=None):
        calls.append(len(conversations))
        return real(conversations, max_tokens)

    student.answer = counted
    questions = ["What is 2 + 2? Reply with only the number.", "What is 10 - 3? Reply with only the number."]
    fields = {"question": [questions[0]] * 2 + [questions[1]] * 2, "answer": ["#### 4"] * 2 + ["#### 7"] * 2}
    guidance = ["Reply with: #### 4", "Think step by step about the sum of two and two, carefully, "
                "then reply with the number alone.", "Reply with: #### 7", "#### 9"]
    got = teaching(fields["question"], guidance, fields, student=student, max_tokens=24, token_budget=10)
    assert calls == [2, 4]  # one batch without guidance (two unique questions), one with
    plain = real([[{"role": "user", "content": q}] for q in questions], 24)
    taught = real([[{"role": "user", "content": f"{q}\n\nGuidance: {g}"}] for q, g in zip(fields["question"], guidance, strict=True)], 24)
    config = RewardConfig(token_budget=10)
    want = [teaching_reward(exact_match(["q"], [plain[i // 2]], {"answer": [fields["answer"][i]]})[0] == 1.0,
                            exact_match(["q"], [taught[i]], {"answer": [fields["answer"][i]]})[0] == 1.0,
                            len(guidance[i].split()), config=config) for i in range(4)]
    assert got == want
    # each value is an outcome less its length cost: 4 words of a 10-word budget cost 0.08, 16 words the full 0.2
    assert min(abs(got[0] - v) for v in (-0.08, 0.92, -2.08)) < 1e-9
    assert min(abs(got[1] - v) for v in (-0.2, 0.8, -2.2)) < 1e-9
