"""Job settings the same way for every job: a YAML file, then key=value, then flags; errors name
the key, the flag or the file."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, Field

from localforge.errors import ConfigError, UsageError
from localforge.settings import BackendChoice, is_override, load_settings


class Job(BackendChoice):
    model_config = ConfigDict(extra="forbid")
    PATHS: ClassVar[tuple[str, ...]] = ("data",)

    data: str = "data.jsonl"
    passes: int = Field(1, ge=1)
    nested: dict = Field(default_factory=dict)


def test_file_then_overrides_then_flags(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("passes: 2\nmodel: from-file\nbackend: torch\n")
    job = load_settings(Job, cfg, ["passes=3", "nested.depth=4"], {"passes": ("--passes", 5), "model": ("--model", None)})
    assert (job.passes, job.model, job.backend, job.nested) == (5, "from-file", "torch", {"depth": 4})
    assert load_settings(Job).model_dump()["concurrency"] == 4  # defaults live in the model alone


def test_a_relative_path_is_read_beside_the_config_file_when_it_is_there(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "train.jsonl").write_text("{}\n")
    (tmp_path / "conf" / "job.yaml").write_text("data: train.jsonl\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(Job, "conf/job.yaml").data == "conf/train.jsonl"
    assert load_settings(Job, "conf/job.yaml", ["data=elsewhere.jsonl"]).data == "elsewhere.jsonl"  # not there: as given


@pytest.mark.parametrize("where, kwargs, error, message", [
    ("file", {"overrides": []}, ConfigError, "job.yaml: config key 'passes': input should be greater than or equal to 1, got 0"),
    ("override", {"overrides": ["passes=x"]}, ConfigError, "config key 'passes': expected a whole number, got 'x'"),
    ("flag", {"flags": {"passes": ("--passes", -2)}}, UsageError, "--passes: input should be greater than or equal to 1, got -2"),
    ("unknown", {"overrides": ["pases=2"]}, ConfigError, "config key 'pases' is not known; check its spelling"),
])
def test_errors_name_the_key_or_the_flag(tmp_path, where, kwargs, error, message):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("passes: 0\n" if where == "file" else "passes: 1\n")
    with pytest.raises(error) as info:
        load_settings(Job, cfg, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == (2 if where == "flag" else 1)


@pytest.mark.parametrize("text, message", [
    ("a: [1, 2\n", r"job.yaml: not valid YAML \(line 2\)"),
    ("- a\n- b\n", "job.yaml: expected a mapping of config keys, got list"),
])
def test_bad_files(tmp_path, text, message):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(Job, cfg)
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(Job, tmp_path / "nope.yaml")


def test_overrides_are_told_from_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "odd=name.md").write_text("a file")
    assert is_override("chunk_size=256") and is_override("lora.rank=8")
    assert not is_override("odd=name.md") and not is_override("docs/") and not is_override("--x=1")


def test_a_model_without_paths_or_backend():
    class Plain(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int = 1

    assert load_settings(Plain, None, ["n=7"]).n == 7


@pytest.mark.parametrize("overrides, message", [
    (["passes=0"], "override 'passes=0': config key 'passes': input should be greater than or equal to 1, got 0"),
    (["passes=2", "passes=-1"], "override 'passes=-1': config key 'passes'"),  # the one that won
    (["concurrency=0"], "override 'concurrency=0': config key 'concurrency'"),
    (["timeout=0", "passes=2"], "override 'timeout=0': config key 'timeout'"),
])
def test_a_bad_override_is_named_not_the_file(tmp_path, overrides, message):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("passes: 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(Job, cfg, overrides)
    assert str(info.value).startswith(message) and "job.yaml" not in str(info.value)


def test_key_error_names_where_a_value_came_from(tmp_path):
    from localforge.settings import key_error

    where = {"path": tmp_path / "job.yaml", "overrides": ["nested.depth=9"], "flags": {"passes": ("--passes", 3)}}
    assert isinstance(key_error("passes", "too many", **where), UsageError)
    assert str(key_error("passes", "too many", **where)) == "--passes: too many"
    assert str(key_error("nested.depth", "too deep", **where)).startswith("override 'nested.depth=9': config key")
    assert str(key_error("data", "gone", **where)) == f"{tmp_path / 'job.yaml'}: config key 'data': gone"
