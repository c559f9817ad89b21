"""The rewards of a GRPO run: plain functions with one signature, named in the config.

    reward(prompts, completions, fields, **options) -> list[float]

``prompts`` and ``completions`` are texts, one per completion (a prompt repeats once per
generation of its group); ``fields`` maps each other column of the data rows to its values,
aligned with them (``fields["answer"][i]`` is the reference of completion ``i``). Options are
the reward's own keys in the config:

    grpo:
      rewards:
        - exact_match                              # GSM8K: the final number equals the reference's
        - {name: format, weight: 0.2}              # ends with a "#### N" line
        - {name: length, target: 300, weight: 0.1}

A run calls them through ``Rewards``, which checks what each returns (one finite number per
completion) and turns any failure into ``RewardFailed`` naming the reward: the run stops, marked
failed with that one line, rather than with a traceback from inside an engine.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from localforge.errors import ConfigError, LocalforgeError
from localforge.teach.checkers import exact_number, final_number, normalise_number
from localforge.teach.reward import RewardConfig, teaching_reward

Fields = dict[str, list]
RewardFn = Callable[..., list[float]]


class RewardFailed(LocalforgeError):
    """A reward raised, or returned something other than one finite number per completion."""


# -- the library ---------------------------------------------------------------------------------
def exact_match(prompts: list[str], completions: list[str], fields: Fields, *, answer_field: str = "answer") -> list[float]:
    """1 when the completion's final number (after its last ``####``, else its last number) equals
    the reference's (GSM8K's ``#### N``, or the reference's last number), else 0."""
    refs = _column(fields, answer_field, "exact_match")
    return [1.0 if exact_number(c, str(r)) else 0.0 for c, r in zip(completions, refs, strict=True)]


def format(prompts: list[str], completions: list[str], fields: Fields, *,  # noqa: A001 (the config's name)
           pattern: str = r"####\s*-?[\d,]*\.?\d+\s*$") -> list[float]:
    """1 when the completion matches ``pattern`` (default: it ends with a GSM8K ``#### N`` line), else 0."""
    rx = re.compile(pattern, re.MULTILINE)
    return [1.0 if rx.search(c.strip()) else 0.0 for c in completions]


def length(prompts: list[str], completions: list[str], fields: Fields, *, target: int = 200,
           unit: str = "chars") -> list[float]:
    """1 up to ``target`` characters (or words, ``unit: words``), falling linearly to 0 at twice that."""
    def size(c: str) -> int:
        return len(c.split()) if unit == "words" else len(c)

    return [max(0.0, min(1.0, 2.0 - size(c) / target)) for c in completions]


def json_valid(prompts: list[str], completions: list[str], fields: Fields, *, schema: dict | None = None,
               schema_field: str = "schema") -> list[float]:
    """1 when the completion holds a JSON object that the JSON schema accepts (the ``schema``
    option, else each row's ``schema_field``), 0.5 for a JSON object the schema refuses, else 0."""
    import jsonschema

    schemas = [schema] * len(completions) if schema is not None else _column(fields, schema_field, "json_valid")
    out = []
    for c, s in zip(completions, schemas, strict=True):
        obj = _json_object(c)
        if obj is None:
            out.append(0.0)
            continue
        s = json.loads(s) if isinstance(s, str) else s
        out.append(1.0 if jsonschema.Draft202012Validator(s).is_valid(obj) else 0.5)
    return out


def json_fields(prompts: list[str], completions: list[str], fields: Fields, *, answer_field: str = "answer") -> list[float]:
    """The share of the reference object's fields that the completion's JSON object gives the same
    value (text compared without case and outer spaces, numbers by value); 0 without an object."""
    refs = _column(fields, answer_field, "json_fields")
    out = []
    for c, ref in zip(completions, refs, strict=True):
        if isinstance(ref, str):
            try:
                ref = json.loads(ref)
            except ValueError:
                pass
        if not isinstance(ref, dict) or not ref:
            raise ValueError(f"the '{answer_field}' field must be a non-empty JSON object for json_fields")
        got = _json_object(c) or {}
        out.append(sum(_same(got.get(k), v) for k, v in ref.items()) / len(ref))
    return out


def teaching(prompts: list[str], completions: list[str], fields: Fields, *, student: Any = None,
             answer_field: str = "answer", question_field: str = "question", max_tokens: int = 256,
             improvement: float = 1.0, degradation_penalty: float = 2.0, length_cost: float = 0.2,
             token_budget: int = 200) -> list[float]:
    """The teaching reward (``teach.reward.teaching_reward``): the completion is guidance for a
    student. The student answers each question without guidance once and with each completion as
    guidance, in one batch each; a wrong answer turned right earns ``improvement``, a right one
    turned wrong costs ``degradation_penalty`` times that, and longer guidance costs up to
    ``length_cost`` (``token_budget`` words). ``student`` is a loaded backend (``grpo.student``)."""
    if student is None:
        raise ValueError("no student: set grpo.student (backend and model) for the teaching reward")
    config = RewardConfig(improvement=improvement, degradation_penalty=degradation_penalty,
                          length_cost=length_cost, token_budget=token_budget)
    refs = [str(r) for r in _column(fields, answer_field, "teaching")]
    questions = [str(q) for q in fields.get(question_field) or prompts]
    unique = list(dict.fromkeys(questions))
    plain = student.answer([[{"role": "user", "content": q}] for q in unique], max_tokens)
    before = {q: exact_number(a, r) for q, a, r in zip(unique, plain, [refs[questions.index(q)] for q in unique],
                                                         strict=True)}
    taught = student.answer([[{"role": "user", "content": f"{q}\n\nGuidance: {c}"}]
                             for q, c in zip(questions, completions, strict=True)], max_tokens)
    return [teaching_reward(before[q], exact_number(a, r), len(c.split()), config=config)
            for q, a, r, c in zip(questions, taught, refs, completions, strict=True)]


REWARDS: dict[str, RewardFn] = {f.__name__: f for f in (exact_match, format, length, json_valid, json_fields, teaching)}
NEEDS_STUDENT = ("teaching",)


class Student:
    """The teaching reward's student: a backend (any of the registry's, as ``grpo.student`` says)
    that answers a batch of conversations greedily, in one ``generate`` call."""

    def __init__(self, options: dict):
        from localforge.backends import get_backend

        options = dict(options)
        self.max_tokens = int(options.pop("max_tokens", 256))
        self.backend = get_backend(options.pop("backend", "auto"), options.pop("model", None), **options)

    @classmethod
    def of(cls, backend: Any, max_tokens: int = 256) -> Student:
        """A student over a backend already loaded."""
        self = cls.__new__(cls)
        self.backend, self.max_tokens = backend, max_tokens
        return self

    def answer(self, conversations: list[list[dict]], max_tokens: int | None = None) -> list[str]:
        from localforge.backends import GenerationParams

        params = GenerationParams(max_tokens=max_tokens or self.max_tokens, temperature=0.0)
        return [r.text for r in self.backend.generate(conversations, params)]

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close:
            close()


STUDENT_KEYS = ("backend", "model", "base_url", "api_key_env", "timeout", "concurrency", "adapter", "max_tokens")


def check_student(student: dict, specs: Sequence) -> None:
    """The ``grpo.student`` section, checked before any work: required by the teaching reward
    (with a model), its keys known."""
    if not any(s.name in NEEDS_STUDENT for s in specs):
        return
    if not student or not student.get("model"):
        raise ConfigError("config key 'grpo.student': the teaching reward needs a student: set "
                          "grpo.student.backend and grpo.student.model")
    for key in student:
        if key not in STUDENT_KEYS:
            raise ConfigError(f"config key 'grpo.student.{key}': unknown key: use {', '.join(STUDENT_KEYS)}")


# -- running them --------------------------------------------------------------------------------
@dataclass
class Reward:
    name: str
    weight: float
    fn: RewardFn
    options: dict


class Rewards:
    """The config's rewards, checked and bound to their options; ``score`` runs them all."""

    def __init__(self, specs: Sequence, student: Any = None):
        self.items = [bind(s.name, s.options, s.weight, student) for s in specs]
        self.student = student
        self.step = 0  # the step being scored, for the error message

    def close(self) -> None:
        if self.student is not None and hasattr(self.student, "close"):
            self.student.close()

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.items]

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.items]

    def score(self, prompts: list[str], completions: list[str], fields: Fields) -> list[list[float]]:
        """Each reward's values, one list per reward, every one checked."""
        return [self.one(r, prompts, completions, fields) for r in self.items]

    def one(self, r: Reward, prompts: list[str], completions: list[str], fields: Fields) -> list[float]:
        where = f"reward '{r.name}' failed at step {self.step + 1}"
        try:
            values = r.fn(list(prompts), list(completions), fields, **r.options)
        except LocalforgeError as exc:
            raise RewardFailed(f"{where}: {exc}") from None
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            raise RewardFailed(f"{where}: {type(exc).__name__}" + (f": {lines[0][:300]}" if lines else "")) from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise RewardFailed(f"{where}: it returned {type(values).__name__} values that are not numbers") from None
        if len(values) != len(completions):
            raise RewardFailed(f"{where}: it returned {len(values)} values for {len(completions)} completions")
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            raise RewardFailed(f"{where}: it returned {bad} (rewards must be finite numbers)")
        return values


def bind(name: str, options: dict, weight: float = 1.0, student: Any = None) -> Reward:
    """A reward of the library with its options, checked against its keywords (ConfigError naming
    the key otherwise)."""
    if name not in REWARDS:
        raise ConfigError(f"config key 'grpo.rewards': unknown reward {name!r}: choose from {', '.join(REWARDS)}")
    fn = REWARDS[name]
    allowed = [p for p, v in inspect.signature(fn).parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY
               and p != "student"]
    for key in options:
        if key not in allowed:
            raise ConfigError(f"config key 'grpo.rewards': reward {name!r} has no option {key!r}"
                              + (f": it takes {', '.join(allowed)}" if allowed else ": it takes none"))
    if name == "length" and (not isinstance(options.get("target", 1), int) or options.get("target", 1) < 1):
        raise ConfigError(f"config key 'grpo.rewards': length's target must be a whole number, 1 or more "
                          f"(got {options['target']!r})")
    if name == "length" and options.get("unit", "chars") not in ("chars", "words"):
        raise ConfigError(f"config key 'grpo.rewards': length's unit is chars or words (got {options['unit']!r})")
    if name == "format":
        try:
            re.compile(options.get("pattern", ""))
        except (re.error, TypeError) as exc:
            raise ConfigError(f"config key 'grpo.rewards': format's pattern is not a regular expression ({exc})") from None
    if name == "teaching":
        config_keys = ("improvement", "degradation_penalty", "length_cost", "token_budget")
        try:
            RewardConfig(**{k: options[k] for k in config_keys if k in options})
        except ConfigError as exc:
            raise ConfigError(f"config key 'grpo.rewards': teaching: {exc}") from None
        if student is None:
            raise ConfigError("config key 'grpo.student': the teaching reward needs a student: set "
                              "grpo.student.backend and grpo.student.model")
        options = {**options, "student": student}
    return Reward(name, float(weight), fn, dict(options))


def needs_fields(specs: Sequence) -> set[str]:
    """The row fields the config's rewards read (to check the data before any work)."""
    out = set()
    for s in specs:
        fn = REWARDS.get(s.name)
        if fn is None:
            continue
        params = inspect.signature(fn).parameters
        for key in ("answer_field", "schema_field"):
            if key in params and not (key == "schema_field" and "schema" in s.options):
                out.add(s.options.get(key, params[key].default))
    return out


# -- helpers -------------------------------------------------------------------------------------
def _column(fields: Fields, name: str, reward: str) -> list:
    if name not in fields:
        raise ValueError(f"the rows have no '{name}' field, which {reward} compares against")
    return fields[name]


def _json_object(text: str) -> dict | None:
    """The first JSON object in ``text`` (a fenced block or bare), or None."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            start = text.find("{", start + 1)
            continue
        return obj if isinstance(obj, dict) else None
    return None


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want or got == want
    if isinstance(want, int | float) or isinstance(got, int | float):
        a, b = normalise_number(str(got)), normalise_number(str(want))
        return a is not None and a == b
    if isinstance(want, str) and isinstance(got, str):
        return got.strip().casefold() == want.strip().casefold()
    return got == want


__all__ = ["REWARDS", "Reward", "RewardFailed", "Rewards", "bind", "exact_match", "final_number", "format",
           "json_fields", "json_valid", "length", "needs_fields", "teaching"]
