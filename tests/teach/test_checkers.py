"""Answer checkers, on real GSM8K rows (../shared/corpus/gsm8k/test.jsonl)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from localforge.errors import ConfigError
from localforge.teach.checkers import (
    CHECKERS,
    exact_number,
    final_number,
    get_checker,
    judged,
    reference_number,
)

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "gsm8k" / "test.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM8K.is_file(), reason=f"the shared GSM8K corpus is not at {GSM8K}")


@pytest.fixture(scope="module")
def gsm8k() -> list[dict]:
    return [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines() if line.strip()]


@needs_gsm8k
def test_every_gsm8k_reference_parses_to_its_hash_number(gsm8k):
    assert len(gsm8k) == 1319
    for row in gsm8k:
        tail = row["answer"].rsplit("####", 1)[1].strip()
        want = tail.replace(",", "")
        assert reference_number(row["answer"]) == want, row["answer"][-60:]
        assert final_number(row["answer"]) == want
        assert exact_number(row["answer"], row["answer"])
    # the set has thousands separators and negative answers: both are read
    tails = {row["answer"].rsplit("####", 1)[1].strip() for row in gsm8k}
    assert "1,450,000" in tails and "-10" in tails


@needs_gsm8k
def test_model_style_answers_are_checked_against_real_references(gsm8k):
    rows = gsm8k[:200]
    for row in rows:
        want = reference_number(row["answer"])
        work = row["answer"].rsplit("####", 1)[0]  # the worked solution without the final line
        pretty = f"{Decimal(want):,}"  # with thousands separators
        assert exact_number(f"{work}\nSo the answer is ${pretty}.", row["answer"]), want
        assert exact_number(f"{work}\n#### {want}\nThat is all, 7 times over.", row["answer"])  # #### wins
        assert exact_number(f"The answer is {want}.0", row["answer"])
        wrong = str(Decimal(want) + 1)
        assert not exact_number(f"{work}\nThe answer is {wrong}.", row["answer"]), want
        assert not exact_number("I do not know.", row["answer"])


@pytest.mark.parametrize(("text", "want"), [
    ("16 - 3 - 4 = 9", "9"),
    ("16-3-4", "4"),  # a subtraction, not -4
    ("It went down to -3 degrees.", "-3"),
    ("$1,000", "1000"),
    ("1,000 and then 1000.00", "1000"),
    ("half is 0.50 dollars", "0.5"),
    ("#### 2,125", "2125"),
    ("about 50% of them", "50"),
    ("no number here", None),
    ("", None),
])
def test_final_number_normalises(text, want):
    assert final_number(text) == want


def test_commas_dollars_and_trailing_zero_compare_equal():
    assert exact_number("The total is $1,000.", "#### 1000")
    assert exact_number("1000.0", "#### 1,000")
    assert not exact_number("100", "#### 1,000")
    assert not exact_number("1000", "no reference number")


def test_registry_and_unknown_checker_names_the_choices():
    assert get_checker("number") is CHECKERS["number"] is exact_number
    with pytest.raises(ConfigError) as exc:
        get_checker("regex")
    assert "'regex'" in str(exc.value) and "number" in str(exc.value) and "judge" in str(exc.value)
    with pytest.raises(ConfigError, match="judge"):
        get_checker("judge")


def test_judged_checker_calls_the_judge_with_question_answer_and_reference():
    seen = []

    def judge(question, answer, reference):
        seen.append((question, answer, reference))
        return 0.9 if answer == reference else 0.1

    check = get_checker("judge", judge=judge)
    assert check("Paris", "Paris", question="Capital of France?")
    assert not check("Lyon", "Paris", question="Capital of France?")
    assert seen[0] == ("Capital of France?", "Paris", "Paris")
    assert judged(lambda **_: True)("a", "b")
    with pytest.raises(ConfigError, match="judge returned"):
        judged(lambda **_: "yes")("a", "b")
    with pytest.raises(ConfigError, match="callable"):
        judged("not a function")
