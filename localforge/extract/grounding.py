"""Locate every extracted value in the source text.

Exact match first, then a match after normalising whitespace and case, then a fuzzy match above
a threshold; each found value gets its character span in the document text (and its page when
the converter knows pages). A value that cannot be located is marked ungrounded, never kept as
grounded. Numbers are looked up through the ways they are written (``2400``, ``2,400``,
``2400.0``). The chunk is searched first, then the whole document.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

FUZZY_THRESHOLD = 0.85


@dataclass
class Grounding:
    status: str  # "exact", "normalized", "fuzzy", "ungrounded"
    start: int | None = None
    end: int | None = None
    page: int | None = None
    score: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _normalized(text: str) -> tuple[str, list[int]]:
    """Case-folded text with whitespace runs collapsed, and each output char's source offset."""
    out, index, prev_space = [], [], False
    for i, ch in enumerate(text):
        if ch.isspace():
            if prev_space:
                continue
            out.append(" ")
            prev_space = True
        else:
            out.append(ch.lower())
            prev_space = False
        index.append(i)
    return "".join(out), index


def number_forms(value: float | int) -> list[str]:
    forms = []
    if isinstance(value, bool):
        return [str(value).lower(), str(value)]
    if float(value).is_integer():
        n = int(value)
        forms += [str(n), f"{n:,}", f"{n:,}".replace(",", " "), f"{n:,}".replace(",", ".")]
    forms += [repr(value) if isinstance(value, float) else str(value)]
    if isinstance(value, float) and not float(value).is_integer():
        forms += [f"{value:g}", str(value).replace(".", ",")]
    seen, unique = set(), []
    for f in forms:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique


def _find_exact(needle: str, text: str, lo: int, hi: int, word: bool) -> tuple[int, int] | None:
    if not word:
        i = text.find(needle, lo, hi)
        return (i, i + len(needle)) if i >= 0 else None
    m = re.compile(rf"(?<![\w.]){re.escape(needle)}(?![\w]|\.\d)").search(text, lo, hi)
    return (m.start(), m.end()) if m else None


def _find_normalized(needle: str, text: str, lo: int, hi: int) -> tuple[int, int] | None:
    norm, index = _normalized(text[lo:hi])
    want = _normalized(needle.strip())[0]
    i = norm.find(want) if want else -1
    if i < 0:
        return None
    return lo + index[i], lo + index[i + len(want) - 1] + 1


def _find_fuzzy(needle: str, text: str, lo: int, hi: int) -> tuple[int, int, float] | None:
    """The best approximate match of ``needle`` in ``text[lo:hi]``: rapidfuzz's partial ratio
    (Indel similarity of the needle against its best aligned window, in C; linear in the text
    where difflib's SequenceMatcher was quadratic), with the window trimmed of edge spaces."""
    from rapidfuzz import fuzz

    want = needle.strip().lower()
    if len(want) < 4:
        return None  # too short to match approximately without false hits
    hit = fuzz.partial_ratio_alignment(want, text[lo:hi].lower(), score_cutoff=FUZZY_THRESHOLD * 100)
    if hit is None:
        return None
    start, end = hit.dest_start, hit.dest_end
    while start < end and text[lo + start].isspace():
        start += 1
    while end > start and text[lo + end - 1].isspace():
        end -= 1
    return (lo + start, lo + end, hit.score / 100) if end > start else None


def ground(value, text: str, span: tuple[int, int] | None = None, page_at=None) -> Grounding:
    """Locate ``value`` (a string or number) in ``text``, trying ``span`` before the whole text."""
    ranges = [span, (0, len(text))] if span else [(0, len(text))]
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    needles = number_forms(value) if is_number else [str(value)]
    if not any(n.strip() for n in needles):
        return Grounding("ungrounded")

    def done(status, start, end, score=1.0):
        return Grounding(status, start, end, page_at(start) if page_at else None, round(score, 3))

    for lo, hi in ranges:
        for needle in needles:
            hit = _find_exact(needle, text, lo, hi, word=is_number)
            if hit:
                return done("exact", *hit)
    if is_number:
        return Grounding("ungrounded")
    for lo, hi in ranges:
        hit = _find_normalized(needles[0], text, lo, hi)
        if hit:
            return done("normalized", *hit)
    for lo, hi in ranges[:1]:  # fuzzy only where the value came from: elsewhere it is a guess
        hit = _find_fuzzy(needles[0], text, lo, hi)
        if hit:
            return done("fuzzy", *hit)
    return Grounding("ungrounded")


def span_holds(value, status: str, found: str) -> bool:
    """Whether ``found`` (the source text at a stored span) still holds ``value`` as its grounding
    ``status`` says: the value itself (or one of a number's written forms), the same text after
    normalising whitespace and case, or an approximate match above the fuzzy threshold."""
    from rapidfuzz import fuzz

    if not found.strip():
        return False
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if status == "exact":
        return found in (number_forms(value) if is_number else [str(value)])
    if status == "normalized":
        return not is_number and _normalized(found)[0] == _normalized(str(value).strip())[0]
    if status == "fuzzy":
        return not is_number and fuzz.ratio(str(value).strip().lower(), found.lower()) >= FUZZY_THRESHOLD * 100
    return False


def mentions(text: str, value) -> bool:
    """Whether ``text`` states ``value``: as written (a number in one of its written forms, as a
    whole word) or after normalising whitespace and case; never approximately."""
    return ground(value, text).status in ("exact", "normalized")


def walk_values(value, path: str = ""):
    """(field path, value) for every string or number in a record's fields, by the paths
    ``_grounding`` uses (``maker``, ``specs.power``, ``ports[0]``); lists item by item."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk_values(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk_values(v, f"{path}[{i}]")
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        yield path, value


def ground_record(record: dict, text: str, span: tuple[int, int], page_at=None) -> dict:
    """Grounding for every string or number in a record, by field path."""
    return {path: ground(value, text, span, page_at).to_dict() for path, value in walk_values(record)}
