"""JSON Schema to a llama.cpp grammar (GBNF) that also holds integer and number ranges.

llama-cpp-python's ``json_schema_to_gbnf`` (0.3.x) keeps string lengths (minLength/maxLength) and
array sizes but ignores ``minimum``/``maximum`` (a TODO in its converter), so a model sampled
through it can still write ``"age": 250``. ``schema_to_gbnf`` uses that converter and adds:

- integers with ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``: exactly the
  integers in the range (digit by digit, the way a regex for a range is built);
- numbers with ranges: an integer part in the range and up to 15 decimals, no exponent. Exact for
  whole-number bounds; with fractional bounds the first and last unit may overshoot a little
  (``1.2 .. 2.2`` lets ``1.1`` through), which the caller's jsonschema validation catches;
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


def _fraction(a: str, b: str | None, n: int, at_least_one: bool) -> list[list[Atom]]:
    """Digit strings f of length 0..n (1..n with ``at_least_one``) with 0.a <= 0.f <= 0.b
    (``b`` None: no upper bound below 1)."""
    a = a.rstrip("0")
    b = None if b is None else b.rstrip("0")
    out: list[list[Atom]] = []
    if not a and not at_least_one:
        out.append([])  # the empty rest: 0.a is 0
    if n == 0:
        return out
    if not a and b is None:
        return out + [[("0", "9", 1, n)]]
    if b == "":  # only zeros fit under 0.0
        return [] if a else out + [[("0", "0", 1, n)]]
    a0, b0 = (a[0] if a else "0"), (b[0] if b is not None else "9")
    if a0 == b0:
        return out + [[_lit(a0), *r] for r in _fraction(a[1:], None if b is None else b[1:], n - 1, False)]
    out += [[_lit(a0), *r] for r in _fraction(a[1:], None, n - 1, False)]
    if chr(ord(a0) + 1) <= chr(ord(b0) - 1):
        out.append([(chr(ord(a0) + 1), chr(ord(b0) - 1), 1, 1)] + ([("0", "9", 0, n - 1)] if n > 1 else []))
    out += [[_lit(b0), *r] for r in _fraction("", None if b is None else b[1:], n - 1, False)]
    return out


def _split(v: float) -> tuple[int, str]:
    """A non-negative bound as its whole part and its decimal digits: 2.25 -> (2, "25")."""
    whole, _, frac = f"{Decimal(str(v)):f}".partition(".")
    return int(whole), frac


def _decimals(lo: float, hi: float | None) -> list[list[Atom]]:
    """Non-negative decimals k.f (at least one digit after the point) from ``lo`` to ``hi``."""
    k_lo, f_lo = _split(lo)
    n = FRACTION[3]
    frac = lambda a, b: [[_lit("."), *f] for f in _fraction(a, b, n, True)]  # noqa: E731
    if hi is None:
        return ([[*k, *f] for k in _naturals(k_lo, k_lo) for f in frac(f_lo, None)]
                + [[*k, *f] for k in _naturals(k_lo + 1, None) for f in frac("", None)])
    k_hi, f_hi = _split(hi)
    if k_lo == k_hi:
        return [[*k, *f] for k in _naturals(k_lo, k_lo) for f in frac(f_lo, f_hi)]
    out = [[*k, *f] for k in _naturals(k_lo, k_lo) for f in frac(f_lo, None)]
    if k_lo + 1 <= k_hi - 1:
        out += [[*k, *f] for k in _naturals(k_lo + 1, k_hi - 1) for f in frac("", None)]
    return out + [[*k, *f] for k in _naturals(k_hi, k_hi) for f in frac("", f_hi)]


def number_range(lo: float | None, hi: float | None) -> list[list[Atom]]:
    """Numbers from ``lo`` to ``hi`` (inclusive; None is unbounded), whole or with up to 15
    decimals, no exponent: exactly those whose decimal digits lie in the range."""
    whole_lo = math.ceil(lo) if lo is not None else None
    whole_hi = math.floor(hi) if hi is not None else None
    out: list[list[Atom]] = []
    if whole_lo is None or whole_hi is None or whole_lo <= whole_hi:
        out += int_range(whole_lo, whole_hi)
    if hi is None or hi >= 0:
        out += _decimals(max(lo, 0) if lo is not None else 0, hi)
    if lo is None or lo < 0:  # -m for magnitudes m from max(-hi, 0) to -lo
        out += [[_lit("-"), *seq] for seq in _decimals(max(-hi, 0) if hi is not None else 0, -lo if lo is not None else None)]
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


def _bounds(schema: dict, integer: bool) -> tuple[Any, Any]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(xlo, bool) or isinstance(xhi, bool):  # draft 4: booleans beside minimum/maximum
        xlo, lo = (lo, None) if xlo is True else (None, lo)
        xhi, hi = (hi, None) if xhi is True else (None, hi)
    if integer:
        los = [math.ceil(v) for v in (lo,) if v is not None] + [math.floor(v) + 1 for v in (xlo,) if v is not None]
        his = [math.floor(v) for v in (hi,) if v is not None] + [math.ceil(v) - 1 for v in (xhi,) if v is not None]
    else:  # an exclusive bound is held as inclusive here; validation refuses the bound itself
        los = [v for v in (lo, xlo) if v is not None]
        his = [v for v in (hi, xhi) if v is not None]
    return (max(los) if los else None), (min(his) if his else None)


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
                lo, hi = _bounds(schema, kind == "integer")
                pattern = int_range(lo, hi) if kind == "integer" else number_range(lo, hi)
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
