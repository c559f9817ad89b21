"""Structured output that holds ranges: the grammar built from a schema (ranges checked against
Python's own comparison), the grammar in force through real llama.cpp in-process and through the
real llama.cpp server, re-asks with new seeds, and answers cut off at the token limit."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from localforge.backends import (
    BackendError,
    ChatResult,
    GenerationParams,
    RequestTooLarge,
    StructuredOutputError,
    Unsupported,
    forget_probes,
    generate_json,
    get_backend,
    structured_modes,
)
from localforge.backends.base import Backend
from localforge.backends.grammar import (
    as_gbnf,
    as_regex,
    check_gbnf,
    int_range,
    number_range,
    schema_to_gbnf,
)
from localforge.backends.structured import PROBES
from tests.servers import ALIAS, grammar_dropping_proxy

bounds = st.one_of(st.none(), st.integers(-10**6, 10**6))


@settings(max_examples=300, deadline=None)
@given(bounds, bounds, st.lists(st.integers(-2 * 10**6, 2 * 10**6), min_size=1, max_size=30))
def test_integer_range_is_exact(lo, hi, probes):
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    rx = re.compile(as_regex(int_range(lo, hi)))
    for n in probes + [v + d for v in (lo, hi) if v is not None for d in (-1, 0, 1)]:
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(rx.fullmatch(str(n))) == inside, (lo, hi, n)
    assert not rx.fullmatch("007") and not rx.fullmatch("-0") and not rx.fullmatch("+1")


decimal_bounds = st.one_of(st.none(), st.decimals(-1000, 1000, places=3).map(float))


@settings(max_examples=400, deadline=None)
@given(decimal_bounds, decimal_bounds, st.booleans(), st.booleans(),
       st.lists(st.decimals(-1200, 1200, places=4), min_size=1, max_size=30))
def test_number_range_is_exact_on_decimals(lo, hi, lo_x, hi_x, probes):
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    try:
        rx = re.compile(as_regex(number_range(lo, hi, lo_x, hi_x)))
    except ValueError:  # an empty range (lo == hi, one side excluded)
        assert lo == hi and (lo_x or hi_x)
        return
    near = [Decimal(str(v)) + d for v in (lo, hi) if v is not None
            for d in (Decimal("-0.001"), Decimal(0), Decimal("0.0001"), Decimal(1))]
    for d in probes + near:
        for text in {f"{d:f}", f"{d:f}".rstrip("0").rstrip(".") if "." in f"{d:f}" else f"{d:f}"}:
            if text in ("-0", "") or text.startswith("-0") and Decimal(text) == 0:
                continue
            value = Decimal(text)
            inside = ((lo is None or value > Decimal(str(lo)) or (value == Decimal(str(lo)) and not lo_x))
                      and (hi is None or value < Decimal(str(hi)) or (value == Decimal(str(hi)) and not hi_x)))
            assert bool(rx.fullmatch(text)) == inside, (lo, hi, lo_x, hi_x, text)


@settings(max_examples=150, deadline=None)
@given(decimal_bounds, decimal_bounds, st.booleans(), st.booleans(), st.booleans())
def test_every_range_rule_parses_in_llama_cpp(lo, hi, integer, lo_x, hi_x):
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    if integer:
        lo, hi = (None if v is None else round(v) for v in (lo, hi))
    if lo is not None and lo == hi:
        lo_x = hi_x = False
    pattern = int_range(lo, hi) if integer else number_range(lo, hi, lo_x, hi_x)
    check_gbnf(f"root ::= {as_gbnf(pattern)}")


class Reading(BaseModel):
    station: str = Field(max_length=12)
    celsius: float = Field(ge=-40, le=55)
    humidity: int = Field(ge=0, le=100)
    wind: int | None = Field(default=None, ge=0, le=250)


SCHEMAS = {
    "person": {"type": "object", "required": ["name", "age"], "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 20},
        "age": {"type": "integer", "minimum": 18, "maximum": 30}}},
    "rating": {"type": "object", "required": ["stars", "score"], "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "score": {"type": "number", "minimum": 0, "maximum": 1}}},
    "exclusive": {"type": "object", "required": ["n", "x"], "properties": {
        "n": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3},
        "x": {"type": "number", "minimum": -2.5, "maximum": -0.25}}},
    "listed": {"type": "object", "required": ["codes"], "properties": {
        "codes": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "integer", "minimum": 100, "maximum": 120}}}},
    "pydantic": Reading.model_json_schema(),
}
PROMPTS = {
    "person": "Invent a character for a short story.",
    "rating": "Rate the sentence 'The cat sat on the mat.'",
    "exclusive": "Give a small whole number and a negative decimal.",
    "listed": "Give some three-digit codes.",
    "pydantic": "Report the weather at a made-up station.",
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_schema_gives_a_grammar_llama_cpp_parses(name):
    gbnf = schema_to_gbnf(SCHEMAS[name])
    check_gbnf(gbnf)  # raises Unsupported if llama.cpp's parser refuses it
    assert "root ::=" in gbnf


def test_a_grammar_llama_cpp_cannot_parse_is_refused_not_a_crash():
    with pytest.raises(Unsupported, match="cannot parse this grammar"):
        check_gbnf("root ::= undefined-rule")


def test_an_unsatisfiable_range_falls_back_to_the_next_rung():
    with pytest.raises(Unsupported, match="no integer lies between 5 and 2"):
        schema_to_gbnf({"type": "integer", "minimum": 5, "maximum": 2})


# --- the grammar in force: out-of-range values cannot be sampled ------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEMAS)
def test_llamacpp_in_process_samples_only_in_range_values(llamacpp_backend, name):
    """At temperature 1.0, straight through chat with the grammar (no validation, no re-ask):
    every answer must parse and validate, which without the grammar fails for several seeds."""
    schema, gbnf = SCHEMAS[name], schema_to_gbnf(SCHEMAS[name])
    for seed in range(4):
        r = llamacpp_backend.chat([{"role": "user", "content": PROMPTS[name]}],
                                  GenerationParams(max_tokens=120, temperature=1.0, seed=seed, grammar=gbnf))
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), schema)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEMAS)
def test_llama_server_takes_the_grammar_and_every_answer_is_valid_first_time(llama_server, name):
    with get_backend("openai", ALIAS, base_url=llama_server.url) as be:
        forget_probes(be)
        assert structured_modes(be)[0] == "grammar"
        calls = _count_calls(be)
        for seed in range(3):
            out = generate_json(be, [{"role": "user", "content": PROMPTS[name]}], SCHEMAS[name],
                                GenerationParams(max_tokens=120, temperature=0.7, seed=seed))
            jsonschema.validate(out, SCHEMAS[name])
        assert PROBES.accepted(be.identity(), "grammar")
        assert [m for m, _ in calls] == ["grammar"] * 3  # one call each: nothing was re-asked


@pytest.mark.slow
def test_a_server_that_ignores_the_grammar_field_is_found_out_and_the_ladder_goes_on(llama_server):
    server, url, seen = grammar_dropping_proxy(llama_server.url)
    try:
        with get_backend("openai", ALIAS, base_url=url) as be:
            forget_probes(be)
            out = generate_json(be, [{"role": "user", "content": PROMPTS["person"]}], SCHEMAS["person"],
                                GenerationParams(max_tokens=80, temperature=0.7, seed=1))
            assert out["name"]
            assert "grammar" in PROBES.rejected(be.identity())
            assert "grammar" in seen[0]  # the probe went out, and its answer gave the server away
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_prompt_too_long_while_probing_is_that_error_not_a_rejected_mode(llama_server):
    """A server's context error on the first JSON-mode call used to mark JSON mode rejected for
    the rest of the process: later calls fell to prompting and came back in code fences."""
    long = [{"role": "user", "content": "word " * 3000}]
    with get_backend("openai", ALIAS, base_url=llama_server.url) as be:
        forget_probes(be)
        for mode in ({"json_object": True}, {"json_schema": SCHEMAS["person"]}):
            with pytest.raises(BackendError) as info:
                be.chat(long, max_tokens=8, **mode)
            assert not isinstance(info.value, Unsupported)
            assert isinstance(info.value, RequestTooLarge) or "context" in str(info.value).lower()
        assert not PROBES.rejected(be.identity())
        r = be.chat([{"role": "user", "content": "Name a colour."}], max_tokens=30, json_object=True)
        assert r.text.lstrip()[:1] in ("{", "[") and "```" not in r.text  # JSON mode in force


def _count_calls(be):
    """Record (mode, seed) of each chat call the ladder makes."""
    calls, inner = [], be.chat

    def chat(conv, params=None, **kw):
        mode = ("grammar" if params.grammar else "json" if params.json_object
                else "schema" if params.json_schema else "prompt")
        out = inner(conv, params, **kw)
        calls.append((mode, params.seed))
        return out

    be.chat = chat
    return calls


# --- re-asks sample anew; a cut-off answer says so --------------------------------------------


class Scripted(Backend):
    name = "scripted"

    def __init__(self, answers, finish="stop"):
        super().__init__("m")
        self.answers, self.finish, self.params = list(answers), finish, []

    def generate(self, conversations, params):
        self.params.append(params)
        self.seen = conversations[0]
        return [ChatResult(self.answers.pop(0), 1, 1, self.finish, 0.0, self.name)]


DIGIT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"]}


@pytest.mark.parametrize("seed", [None, 0, 7, 2**31 - 1])
def test_each_reask_has_its_own_seed_and_a_run_repeats(seed):
    seeds = []
    for _ in range(2):
        be = Scripted(['{"n": 42}', '{"n": 42}', '{"n": 42}'])
        with pytest.raises(StructuredOutputError) as info:
            generate_json(be, [{"role": "user", "content": "A digit?"}], DIGIT,
                          GenerationParams(temperature=0.7, seed=seed))
        sent = [p.seed for p in be.params]
        assert sent[0] == seed and len(set(sent)) == 3 and all(s is not None for s in sent[1:])
        assert [a.seed for a in info.value.attempts] == sent
        seeds.append(sent)
    assert seeds[0] == seeds[1]  # derived, so a run (and its call cache) repeats


@pytest.mark.slow
def test_reasks_on_real_llamacpp_each_sample_with_a_new_seed(llamacpp_backend):
    """The prompt rung (the native rungs set aside), a range the model misses at first."""
    schema = {"type": "object", "properties": {"year": {"type": "integer", "minimum": 3001, "maximum": 3002}},
              "required": ["year"]}
    for mode in ("grammar", "schema", "json"):
        PROBES.reject(llamacpp_backend.identity(), mode)
    calls = _count_calls(llamacpp_backend)
    try:
        generate_json(llamacpp_backend, [{"role": "user", "content": "In what year did the war end?"}], schema,
                      GenerationParams(max_tokens=40, temperature=0.7, seed=3), attempts=3)
    except StructuredOutputError as exc:
        assert [a.mode for a in exc.attempts] == ["prompt"] * 3
    finally:
        del llamacpp_backend.chat
        forget_probes(llamacpp_backend)
    assert calls[0][1] == 3 and len({s for _, s in calls}) == len(calls)


@pytest.mark.parametrize("answer", ['{"n": 4', '```json\n{"n": ', '{"n": [1, 2, 3, 4, 5, 6'])
def test_an_answer_cut_at_the_token_limit_says_so(answer):
    be = Scripted([answer] * 3, finish="length")
    with pytest.raises(StructuredOutputError) as info:
        generate_json(be, [{"role": "user", "content": "A digit?"}], DIGIT, GenerationParams(max_tokens=5))
    assert "the answer reached the token limit (5 tokens)" in str(info.value)
    assert len(str(info.value).splitlines()) == 1
    for attempt in info.value.attempts:
        assert attempt.finish_reason == "length" and "reached the token limit" in attempt.error
    assert "cut off" in be.seen[-1]["content"]  # the re-ask tells the model why


@pytest.mark.slow
def test_a_real_answer_cut_at_the_token_limit_says_so(llamacpp_backend):
    with pytest.raises(StructuredOutputError) as info:
        generate_json(llamacpp_backend, [{"role": "user", "content": "Invent a character."}], SCHEMAS["person"],
                      GenerationParams(max_tokens=4, temperature=0.7, seed=1))
    assert "the answer reached the token limit (4 tokens)" in str(info.value)
    assert all(a.finish_reason == "length" for a in info.value.attempts)


@pytest.mark.parametrize("schema, want", [
    ({"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3}, int_range(-2, 2)),
    ({"type": "integer", "minimum": 1.5, "maximum": 4.5}, int_range(2, 4)),
    ({"type": "integer", "minimum": 0, "exclusiveMinimum": 0, "maximum": 9}, int_range(1, 9)),
    ({"type": "integer", "minimum": 5, "exclusiveMaximum": True, "maximum": 10}, int_range(5, 9)),  # draft 4
    ({"type": "number", "minimum": 0, "exclusiveMaximum": 1}, number_range(0, 1, False, True)),
    ({"type": "number", "exclusiveMinimum": 0.5, "maximum": 2}, number_range(0.5, 2, True, False)),
])
def test_the_root_rule_is_the_range(schema, want):
    root = next(line for line in schema_to_gbnf(schema).splitlines() if line.startswith("root ::="))
    assert root == f"root ::= {as_gbnf(want)} space"
