"""Answer checkers: is a student's answer right, given the reference?

A checker is ``check(answer, reference, question="") -> bool``. ``number`` compares final numbers
(GSM8K: the reference ends with ``#### 18``; a model answer's number is the one after its own
``####`` if it wrote one, else the last number in its text). A teacher-judged checker needs a
backend, which this module never imports: ``judged(judge)`` wraps any callable that asks a teacher
(the teach job builds that callable from ``generate_json``), and ``get_checker("judge", judge=...)``
returns it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Protocol

from localforge.errors import ConfigError

# A number with thousands separators ("1,000", "12,345.5") or a plain one ("18", "0.25"); a minus
# sign counts only where it is not a subtraction ("16-3-4" ends in 4, not -4).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MARK = "####"


class Checker(Protocol):
    def __call__(self, answer: str, reference: str, question: str = "") -> bool: ...


def normalise_number(text: str) -> str | None:
    """``"$1,000.00"`` -> ``"1000"``, ``"0.50"`` -> ``"0.5"``, ``"-3"`` -> ``"-3"``; None if not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".%")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    return [n for n in (normalise_number(m.group()) for m in _NUMBER.finditer(text)) if n is not None]


def final_number(text: str | None) -> str | None:
    """The final number of a worked answer, normalised: the first number after the last ``####``
    when there is one, else the last number in the text; None when there is no number."""
    if not isinstance(text, str):
        return None
    if _MARK in text:
        found = _numbers(text.rsplit(_MARK, 1)[1])
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def reference_number(reference: str) -> str | None:
    """A GSM8K reference's answer: strictly the number after ``#### `` (None without one)."""
    if not isinstance(reference, str) or _MARK not in reference:
        return None
    found = _numbers(reference.rsplit(_MARK, 1)[1])
    return found[0] if found else None


def exact_number(answer: str, reference: str, question: str = "") -> bool:
    """True when the answer's final number equals the reference's (``#### N``, or its last number)."""
    want = reference_number(reference) or final_number(reference)
    got = final_number(answer)
    return want is not None and got is not None and Decimal(got) == Decimal(want)


Judge = Callable[..., "bool | float"]


def judged(judge: Judge, threshold: float = 0.5) -> Checker:
    """A checker that asks a teacher: ``judge(question=..., answer=..., reference=...)`` returns a
    verdict (True/False) or a score from 0 to 1 (correct at ``threshold`` or above). The judge owns
    the backend; this module stays engine-free."""
    if not callable(judge):
        raise ConfigError("checker 'judge' needs a callable judge (question, answer, reference) -> bool or 0..1")

    def check(answer: str, reference: str, question: str = "") -> bool:
        verdict = judge(question=question, answer=answer, reference=reference)
        if isinstance(verdict, bool):
            return verdict
        if isinstance(verdict, int | float) and 0 <= verdict <= 1:
            return float(verdict) >= threshold
        raise ConfigError(f"checker 'judge': the judge returned {verdict!r}; it must return True/False or 0..1")

    return check


CHECKERS: dict[str, Checker] = {"number": exact_number}
NEEDS_JUDGE = ("judge",)


def get_checker(name: str, judge: Judge | None = None) -> Checker:
    """The checker called ``name``: one of CHECKERS, or ``judge`` (which needs ``judge``)."""
    if name in CHECKERS:
        return CHECKERS[name]
    if name in NEEDS_JUDGE:
        if judge is None:
            raise ConfigError("checker 'judge' needs a teacher to judge the answers: give a teacher backend and model")
        return judged(judge)
    choices = ", ".join([*CHECKERS, *NEEDS_JUDGE])
    raise ConfigError(f"unknown checker {name!r}: choose one of {choices}")
