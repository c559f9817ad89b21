"""The Backend interface's shared behaviour, with the smallest real subclass."""

from __future__ import annotations

import pytest

from localforge.backends import Backend, ChatResult, GenerationParams, Unsupported
from localforge.backends.types import truncate_at_stop
from localforge.errors import LocalforgeError


class Echo(Backend):
    """Echoes the last user message: a real Backend whose output is known in advance."""

    name = "echo"

    def generate(self, conversations, params):
        out = []
        for conv in conversations:
            text, _ = truncate_at_stop(conv[-1]["content"][: params.max_tokens], params.stop)
            out.append(ChatResult(text, len(conv), len(text), "stop", 0.0, self.name, self.model_ref))
        return out


def test_single_and_batch_shapes():
    be = Echo("m")
    one = be.chat([{"role": "user", "content": "hello"}])
    assert isinstance(one, ChatResult) and one.text == "hello" and one.total_tokens == 6
    many = be.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "bb"}]])
    assert [r.text for r in many] == ["a", "bb"]
    assert be.chat([]) == []


def test_overrides_reach_the_engine():
    assert Echo("m").chat([{"role": "user", "content": "abcdef"}], max_tokens=3).text == "abc"
    assert Echo("m").chat([{"role": "user", "content": "one. two"}], stop=["."]).text == "one"


@pytest.mark.parametrize(
    "conv, match",
    [
        ([{"role": "user"}], "message 0: expected"),
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ],
)
def test_bad_conversations_name_the_message(conv, match):
    with pytest.raises(LocalforgeError, match=match):
        Echo("m").chat(conv)


def test_json_schema_on_a_backend_without_it_is_unsupported():
    with pytest.raises(Unsupported, match="backend 'echo' cannot constrain output"):
        Echo("m").chat([{"role": "user", "content": "x"}], json_schema={"type": "object"})


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")],
)
def test_params_are_validated(kwargs, match):
    with pytest.raises(LocalforgeError, match=match):
        GenerationParams(**kwargs)


def test_stop_accepts_a_string_and_truncates_at_the_earliest():
    assert GenerationParams(stop="x").stop == ("x",)
    assert truncate_at_stop("a.b!c", ["!", "."]) == ("a", True)
    assert truncate_at_stop("abc", ["z"]) == ("abc", False)


def test_health_reports_instead_of_raising():
    class Broken(Echo):
        def generate(self, conversations, params):
            raise RuntimeError("engine exploded\nsecond line")

    health = Broken("m").health()
    assert not health.ok and health.detail == "engine exploded"
    assert Echo("m").health().ok
