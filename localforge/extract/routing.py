"""Model routing by document complexity: a small model for simple documents, a larger one for
complex ones. ``--model small,large --route "chars>20000|tables>2|pages>10"``: a document that
meets any condition goes to the second model."""

from __future__ import annotations

import re

from localforge.errors import ConfigError

DEFAULT_RULE = "chars>20000|tables>2"
_COND = re.compile(r"^\s*(chars|tables|pages)\s*>\s*(\d+)\s*$")
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}", re.MULTILINE)  # a Markdown table's header rule


def measures(text: str, pages: int) -> dict[str, int]:
    return {"chars": len(text), "tables": len(_TABLE_RULE.findall(text)), "pages": pages}


def parse_rule(rule: str):
    conds = []
    for part in re.split(r"\|| or ", rule):
        m = _COND.match(part)
        if not m:
            raise ConfigError(f"--route: cannot read '{part.strip()}'; write conditions like "
                              "\"chars>20000|tables>2|pages>10\"")
        conds.append((m.group(1), int(m.group(2))))
    return lambda facts: any(facts[name] > limit for name, limit in conds)


def models(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not 1 <= len(names) <= 2:
        raise ConfigError(f"--model '{spec}': give one model, or a small and a large one as SMALL,LARGE")
    return names


def pick(spec: str, rule: str | None, text: str, pages: int) -> str:
    names = models(spec)
    if len(names) == 1:
        return names[0]
    return names[1] if parse_rule(rule or DEFAULT_RULE)(measures(text, pages)) else names[0]
