"""Structured output: JSON extraction and repair (property-based), and the ladder end to end."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from localforge.backends import Backend, ChatResult, describe_schema, generate_json
from localforge.backends.structured import (
    JSONExtractionError,
    StructuredOutputError,
    extract_json,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
containers = st.one_of(st.lists(json_values, max_size=4), st.dictionaries(st.text(max_size=8), json_values, max_size=4))
prose = st.text(alphabet=st.characters(blacklist_characters="{}[]`\"\\"), max_size=40)


@given(containers, prose, prose)
def test_finds_json_amid_prose(value, before, after):
    assert extract_json(f"{before}{json.dumps(value)}{after}") == value


@given(containers, prose)
def test_finds_json_in_a_code_fence(value, before):
    assert extract_json(f"{before}\n```json\n{json.dumps(value, indent=2)}\n```\nDone.") == value


@given(st.dictionaries(st.text(alphabet="abcdefgh", min_size=1, max_size=6), st.integers(), min_size=1, max_size=5))
def test_repairs_trailing_commas(d):
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in d.items()) + ",}"
    assert extract_json(text) == d


@given(st.dictionaries(st.text(alphabet="abc", min_size=1, max_size=4), st.sampled_from([True, False, None]), min_size=1))
def test_repairs_python_literals_but_not_inside_strings(d):
    text = "{" + ", ".join(f'"{k}": {v!r}' for k, v in d.items()) + ', "note": "True story, None left"}'
    assert extract_json(text) == {**d, "note": "True story, None left"}


@settings(max_examples=50)
@given(prose)
def test_text_without_json_is_a_clean_error(text):
    try:
        extract_json(text)
    except JSONExtractionError as exc:
        assert "no JSON object found" in str(exc)


def test_schema_description_for_small_models():
    d = describe_schema({"type": "object", "required": ["age"], "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string"}},
        "kind": {"enum": ["a", "b"]}}})
    assert d == ('a JSON object with the keys "age" (integer, from 18 to 99); '
                 '"tags" (array of string, optional); "kind" (any, one of "a", "b", optional)')


class Scripted(Backend):
    """A real Backend whose answers are given in advance, to drive the ladder's re-ask path."""

    name = "scripted"

    def __init__(self, answers):
        super().__init__("m")
        self.answers, self.seen = list(answers), []

    def generate(self, conversations, params):
        self.seen.append(conversations[0])
        return [ChatResult(self.answers.pop(0), 1, 1, "stop", 0.0, self.name)]


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"]}


def test_reasks_with_the_validation_error_then_succeeds():
    be = Scripted(["Sure! {oops", '{"n": 42}', 'Here: ```json\n{"n": 7}\n```'])
    assert generate_json(be, [{"role": "user", "content": "A digit?"}], SCHEMA) == {"n": 7}
    last = be.seen[-1]
    assert last[-2] == {"role": "assistant", "content": '{"n": 42}'}
    assert "n: 42 is greater than the maximum of 9" in last[-1]["content"]


def test_final_failure_carries_every_attempt():
    be = Scripted(["nothing", "[1, 2]", '{"n": 0}'])
    with pytest.raises(StructuredOutputError) as info:
        generate_json(be, [{"role": "user", "content": "A digit?"}], SCHEMA)
    assert [a.text for a in info.value.attempts] == ["nothing", "[1, 2]", '{"n": 0}']
    assert [a.mode for a in info.value.attempts] == ["prompt"] * 3
    assert "no JSON object found" in info.value.attempts[0].error
    assert "n: 0 is less than the minimum of 1" in str(info.value)


def test_a_check_is_reasked_like_a_schema_error():
    """``check`` says what a schema cannot (here: the answer must be odd); its message is fed back."""
    def odd(obj):
        if obj["n"] % 2 == 0:
            raise ValueError(f"n: {obj['n']} is even; give an odd digit")

    be = Scripted(['{"n": 4}', '{"n": 3}'])
    assert generate_json(be, [{"role": "user", "content": "A digit?"}], SCHEMA, check=odd) == {"n": 3}
    assert "n: 4 is even; give an odd digit" in be.seen[-1][-1]["content"]
    be = Scripted(['{"n": 2}', '{"n": 4}'])
    with pytest.raises(StructuredOutputError, match="n: 4 is even"):
        generate_json(be, [{"role": "user", "content": "A digit?"}], SCHEMA, attempts=2, check=odd)


class City(BaseModel):
    city: str


@pytest.mark.slow
def test_native_schema_on_llamacpp_in_process_returns_a_model(llamacpp_backend):
    out = generate_json(llamacpp_backend, [{"role": "user", "content": "What is the capital of France?"}], City)
    assert isinstance(out, City) and out.city


@pytest.mark.parametrize("text, want", [
    ("{'name': 'Ann', 'age': 31}", {"name": "Ann", "age": 31}),
    ('{name: "Ann", age: 31}', {"name": "Ann", "age": 31}),
    ('{"name": "Ann" "age": 31}', {"name": "Ann", "age": 31}),
    ('{"name": "Ann", /* c */ "age": 31}', {"name": "Ann", "age": 31}),
    ('{"quote": "She said "hi" twice"}', {"quote": 'She said "hi" twice'}),
    ('{"text": "line one\nline two"}', {"text": "line one\nline two"}),  # a raw newline in a string
])
def test_slips_inside_a_complete_answer_are_repaired(text, want):
    assert extract_json(text) == want


@pytest.mark.parametrize("text", ['{"name": "Bob", "age": 2', '{"tags": ["a", "b"', '{"name": "Bo',
                                  "The answer is five.", '{"x": NaN}', "Infinity"])
def test_cut_off_answers_prose_and_nan_are_refused_not_guessed(text):
    with pytest.raises(JSONExtractionError):
        extract_json(text)
