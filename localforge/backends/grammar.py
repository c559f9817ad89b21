"""JSON Schema to a llama.cpp grammar (GBNF) that also holds integer and number ranges.

llama-cpp-python's ``json_schema_to_gbnf`` (0.3.x) keeps string lengths (minLength/maxLength) and
array sizes but ignores ``minimum``/``maximum`` (a TODO in its converter), so a model sampled
through it can still write ``"age": 250``. ``schema_to_gbnf`` uses that converter and adds:

- integers with ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``: exactly the
  integers in the range (digit by digit, the way a regex for a range is built);
- numbers with ranges (exclusive bounds too): whole or with up to 15 decimals, no exponent,
  digit by digit, so exactly the decimals in the range;
- strings without raw control characters (JSON forbids them; the stock ``char`` rule allows them).

What a grammar cannot hold (``multipleOf``, formats it does not know, ``uniqueItems``) is left to
jsonschema validation after the answer. The range logic is plain Python (``int_range``,
``number_range``) so it is tested against Python's own comparison through ``as_regex``.
"""

from __future__ import annotations

import functools
import json
import math
from decimal import Decimal
from typing import Any

from localforge.backends.types import Unsupported

MAX_DIGITS = 15  # an unbounded side stops at 15 digits, as llama.cpp's own integer rule does
FRACTION = ("0", "9", 1, 15)  # the digits after "."

# An atom is (low char, high char, min count, max count); a sequence is a list of atoms; a
# pattern is a list of sequences (alternatives).
Atom = tuple[str, str, int, int]


def _lit(ch: str) -> Atom:
    return (ch, ch, 1, 1)


def _digits_between(s: str, t: str) -> list[list[Atom]]:
    """Every digit string from ``s`` to ``t`` (same length, ``s <= t``) as alternatives."""
    if not s:
        return [[]]
    if s[0] == t[0]:
        return [[_lit(s[0]), *rest] for rest in _digits_between(s[1:], t[1:])]
    n = len(s) - 1
    lo_full, hi_full = s[1:] == "0" * n, t[1:] == "9" * n
    out: list[list[Atom]] = []
    if not lo_full:
        out += [[_lit(s[0]), *rest] for rest in _digits_between(s[1:], "9" * n)]
    a = s[0] if lo_full else chr(ord(s[0]) + 1)
    b = t[0] if hi_full else chr(ord(t[0]) - 1)
    if a <= b:
        out.append([(a, b, 1, 1)] + ([("0", "9", n, n)] if n else []))
    if not hi_full:
        out += [[_lit(t[0]), *rest] for rest in _digits_between("0" * n, t[1:])]
    return out


def _naturals(lo: int, hi: int | None) -> list[list[Atom]]:
    """Integers ``lo..hi`` (``lo >= 0``; ``hi`` None: up to MAX_DIGITS digits), no leading zeros."""
    top = 10**MAX_DIGITS - 1 if hi is None else hi
    out: list[list[Atom]] = []
    for width in range(len(str(lo)), len(str(top)) + 1):
        a, b = max(lo, 10 ** (width - 1) if width > 1 else 0), min(top, 10**width - 1)
        if a <= b:
            out += _digits_between(str(a), str(b))
    return out


def int_range(lo: int | None, hi: int | None) -> list[list[Atom]]:
    """The integers from ``lo`` to ``hi`` (inclusive; None is unbounded) as JSON writes them."""
    out: list[list[Atom]] = []
    if hi is None or hi >= 0:
        out += _naturals(max(lo, 0) if lo is not None else 0, hi)
    if lo is None or lo < 0:
        mag_lo, mag_hi = max(1, -hi) if hi is not None else 1, -lo if lo is not None else None
        if mag_hi is None or mag_lo <= mag_hi:
            out += [[_lit("-"), *seq] for seq in _naturals(mag_lo, mag_hi)]
    if not out:
        raise ValueError(f"no integer lies between {lo} and {hi}")
    return out


def _fraction(a: str, b: str | None, n: int, at_least_one: bool, gt: bool = False,
              lt: bool = False) -> list[list[Atom]]:
    """Digit strings f of length 0..n (1..n with ``at_least_one``) with 0.a <= 0.f <= 0.b
    (``gt``/``lt``: strictly; ``b`` None: no upper bound below 1)."""
    a = a.rstrip("0")
    b = None if b is None else b.rstrip("0")
    out: list[list[Atom]] = []
    if not at_least_one and not a and not gt and not (b == "" and lt):
        out.append([])  # the empty rest: the value 0 fits
    if n == 0:
        return out
    if b == "":  # the upper bound is 0: only zeros can fit
        return out if (a or gt or lt) else out + [[("0", "0", 1, n)]]
    if not a and not gt and b is None:
        return out + [[("0", "9", 1, n)]]
    a0, b0 = (a[0] if a else "0"), (b[0] if b is not None else "9")
    if a0 == b0:
        rest = _fraction(a[1:], None if b is None else b[1:], n - 1, False, gt, lt and b is not None)
        return out + [[_lit(a0), *r] for r in rest]
    out += [[_lit(a0), *r] for r in _fraction(a[1:], None, n - 1, False, gt)]
    if chr(ord(a0) + 1) <= chr(ord(b0) - 1):
        out.append([(chr(ord(a0) + 1), chr(ord(b0) - 1), 1, 1)] + ([("0", "9", 0, n - 1)] if n > 1 else []))
    out += [[_lit(b0), *r] for r in _fraction("", None if b is None else b[1:], n - 1, False, False,
                                              lt and b is not None)]
    return out


def _split(v: float) -> tuple[int, str]:
    """A non-negative bound as its whole part and its decimal digits: 2.25 -> (2, "25")."""
    whole, _, frac = f"{Decimal(str(v)):f}".partition(".")
    return int(whole), frac


def _decimals(lo: float, hi: float | None, lo_x: bool, hi_x: bool) -> list[list[Atom]]:
    """Non-negative decimals k.f (at least one digit after the point) from ``lo`` to ``hi``
    (``lo_x``/``hi_x``: bounds excluded)."""
    n = FRACTION[3]

    def unit(k: int, a: str, b: str | None, gt: bool, lt: bool) -> list[list[Atom]]:
        return [[*whole, _lit("."), *f] for whole in _naturals(k, k) for f in _fraction(a, b, n, True, gt, lt)]

    k_lo, f_lo = _split(lo)
    if hi is None:
        return unit(k_lo, f_lo, None, lo_x, False) + [
            [*k, _lit("."), ("0", "9", 1, n)] for k in _naturals(k_lo + 1, None)]
    k_hi, f_hi = _split(hi)
    if k_lo == k_hi:
        return unit(k_lo, f_lo, f_hi, lo_x, hi_x)
    out = unit(k_lo, f_lo, None, lo_x, False)
    if k_lo + 1 <= k_hi - 1:
        out += [[*k, _lit("."), ("0", "9", 1, n)] for k in _naturals(k_lo + 1, k_hi - 1)]
    return out + unit(k_hi, "", f_hi, False, hi_x)


def number_range(lo: float | None, hi: float | None, lo_x: bool = False, hi_x: bool = False) -> list[list[Atom]]:
    """Numbers from ``lo`` to ``hi`` (None is unbounded; ``lo_x``/``hi_x``: that bound excluded),
    whole or with up to 15 decimals, no exponent: exactly those whose digits lie in the range."""
    whole_lo = None if lo is None else int(lo) + 1 if lo_x and lo == int(lo) else math.ceil(lo)
    whole_hi = None if hi is None else int(hi) - 1 if hi_x and hi == int(hi) else math.floor(hi)
    out: list[list[Atom]] = []
    if whole_lo is None or whole_hi is None or whole_lo <= whole_hi:
        out += int_range(whole_lo, whole_hi)
    if hi is None or hi > 0 or (hi == 0 and not hi_x):
        nonneg = lo is not None and lo >= 0
        out += _decimals(lo if nonneg else 0, hi, lo_x and nonneg, hi_x)
    if lo is None or lo < 0:  # -m for magnitudes m from max(-hi, 0) to -lo
        nonpos = hi is not None and hi <= 0
        out += [[_lit("-"), *seq] for seq in _decimals(-hi if nonpos else 0, None if lo is None else -lo,
                                                       hi_x and nonpos, lo_x)]
    if not out:
        raise ValueError(f"no number lies between {lo} and {hi}")
    return out


def _compress(seq: list[Atom]) -> list[Atom]:
    """Runs of one single-count atom become one counted atom: [0-9] [0-9] [0-9] -> [0-9]{3}."""
    out: list[Atom] = []
    for a in seq:
        if out and out[-1][:2] == a[:2] and a[2:] == (1, 1) and out[-1][2] == out[-1][3]:
            out[-1] = (a[0], a[1], out[-1][2] + 1, out[-1][3] + 1)
        else:
            out.append(a)
    return out


def _count(m: int, n: int) -> str:
    return "" if (m, n) == (1, 1) else f"{{{m}}}" if m == n else f"{{{m},{n}}}"


def as_gbnf(pattern: list[list[Atom]]) -> str:
    def seq(atoms: list[Atom]) -> str:
        parts: list[str] = []
        for lo, hi, m, n in _compress(atoms):
            if lo == hi and (m, n) == (1, 1) and parts and parts[-1].endswith('"'):
                parts[-1] = parts[-1][:-1] + lo + '"'  # digits, "-" and "." need no escape
            elif lo == hi:
                parts.append(f'"{lo}"{_count(m, n)}')
            else:
                parts.append(f"[{lo}-{hi}]{_count(m, n)}")
        return " ".join(parts)

    return "(" + " | ".join(seq(s) for s in pattern) + ")"


def as_regex(pattern: list[list[Atom]]) -> str:
    """The same pattern as a Python regex (for tests: it must match exactly what the grammar does)."""
    def seq(atoms: list[Atom]) -> str:
        return "".join(
            (f"[{lo}-{hi}]" if lo != hi else ("\\" + lo if lo in "-." else lo)) + _count(m, n)
            for lo, hi, m, n in _compress(atoms)
        )

    return "(?:" + "|".join(seq(s) for s in pattern) + ")"


def _bounds(schema: dict) -> tuple[Any, Any, bool, bool]:
    """(low, high, low excluded, high excluded) from minimum/maximum/exclusiveMinimum/exclusiveMaximum
    (draft 4's boolean exclusives too); the tighter bound wins, excluded on a tie."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(xlo, bool):
        xlo, lo = (lo, None) if xlo else (None, lo)
    if isinstance(xhi, bool):
        xhi, hi = (hi, None) if xhi else (None, hi)
    los = [(v, x) for v, x in ((lo, False), (xlo, True)) if v is not None]
    his = [(v, x) for v, x in ((hi, False), (xhi, True)) if v is not None]
    low = max(los, key=lambda p: (p[0], p[1])) if los else (None, False)
    high = min(his, key=lambda p: (p[0], not p[1])) if his else (None, False)
    return low[0], high[0], low[1], high[1]


def _int_bounds(lo: Any, hi: Any, lo_x: bool, hi_x: bool) -> tuple[int | None, int | None]:
    low = None if lo is None else math.floor(lo) + 1 if lo_x else math.ceil(lo)
    high = None if hi is None else math.ceil(hi) - 1 if hi_x else math.floor(hi)
    return low, high


RANGE_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def schema_to_gbnf(schema: dict) -> str:
    """A GBNF grammar for ``schema`` with ranges held. ``Unsupported`` when llama-cpp-python (whose
    converter this extends) is missing or cannot convert the schema."""
    try:
        from llama_cpp import llama_grammar as lg
    except ImportError as exc:
        raise Unsupported(f"building a grammar needs llama-cpp-python ({exc})") from None

    class RangeConverter(lg.SchemaConverter):
        def visit(self, schema: dict, name: str) -> str:
            kind = schema.get("type")
            rule_name = name + "-" if name in lg.RESERVED_NAMES else name or "root"
            if isinstance(kind, list) and any(k in schema for k in (*RANGE_KEYS, "minLength", "maxLength")):
                alts = [self.visit({**schema, "type": k}, f"{name}{'-' if name else ''}{k}") for k in kind]
                return self._add_rule(rule_name, " | ".join(alts))
            if kind in ("integer", "number") and any(k in schema for k in RANGE_KEYS) \
                    and not any(k in schema for k in ("enum", "const", "$ref", "anyOf", "oneOf")):
                lo, hi, lo_x, hi_x = _bounds(schema)
                pattern = (int_range(*_int_bounds(lo, hi, lo_x, hi_x)) if kind == "integer"
                           else number_range(lo, hi, lo_x, hi_x))
                return self._add_rule(rule_name, as_gbnf(pattern) + " space")
            return super().visit(schema, name)

    try:
        converter = RangeConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "schema")
        converter.visit(resolved, "")
        if "char" in converter._rules:
            converter._rules["char"] = CHAR  # no raw control characters inside strings
        gbnf = converter.format_grammar()
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
        raise Unsupported(f"cannot build a grammar for this schema: {exc}") from None
    check_gbnf(gbnf)
    return gbnf


@functools.lru_cache(maxsize=256)
def check_gbnf(gbnf: str) -> None:
    """Refuse a grammar llama.cpp cannot parse, before it reaches a sampler: llama.cpp (0.3.x) goes
    on with a null sampler and the process (or the server) dies. Parsed without a model's vocab."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise Unsupported(f"checking a grammar needs llama-cpp-python ({exc})") from None
    sampler = llama_cpp.llama_sampler_init_grammar(None, gbnf.encode(), b"root")
    if not sampler:
        raise Unsupported(f"llama.cpp cannot parse this grammar: {gbnf.splitlines()[0][:80] if gbnf else '(empty)'}")
    llama_cpp.llama_sampler_free(sampler)
