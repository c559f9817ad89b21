"""Model references resolve to local files offline; GGUF converts to a portable HF folder."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from localforge.errors import ModelNotFound
from localforge.models import ALIASES, converted_dir, list_models, portable_config, resolve


def test_alias_resolves_to_the_bundled_gguf():
    m = resolve("smollm2-135m")
    assert m.kind == "alias"
    assert m.gguf_path.endswith(ALIASES["smollm2-135m"].filename) and Path(m.gguf_path).is_file()


def test_gguf_file_and_folder_of_one_gguf(tmp_path):
    gguf = Path(resolve("smollm2-135m").gguf_path)
    assert resolve(str(gguf)).kind == "gguf"
    assert resolve(str(gguf.parent)).gguf_path == str(gguf)


def _model_folder(path: Path) -> None:
    """The smallest folder that passes the header checks: a config with a model type, empty weights."""
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")


def test_hf_folder(tmp_path):
    _model_folder(tmp_path)
    m = resolve(str(tmp_path))
    assert (m.kind, m.hf_path, m.gguf_path) == ("hf_folder", str(tmp_path), None)


def test_cached_hub_repo_resolves_offline(tmp_path, monkeypatch):
    snap = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    _model_folder(snap)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    m = resolve("acme/tiny")
    assert (m.kind, m.hf_path) == ("hf_cache", str(snap))


def test_cached_gguf_repo_resolves_to_its_file(tmp_path, monkeypatch):
    snap = tmp_path / "models--acme--tiny-GGUF" / "snapshots" / "def456"
    snap.mkdir(parents=True)
    (snap / "tiny.Q4_K_M.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))  # a whole, empty GGUF
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    m = resolve("acme/tiny-GGUF")
    assert (m.kind, m.gguf_path, m.hf_path) == ("hf_cache", str(snap / "tiny.Q4_K_M.gguf"), None)


def test_uncached_hub_repo_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFound, match="'acme/huge' is not in the local Hugging Face cache"):
        resolve("acme/huge")
    assert time.perf_counter() - t0 < 1.0  # no network retries


@pytest.mark.parametrize(
    "ref, match",
    [
        ("./missing.gguf", "'./missing.gguf' does not exist"),
        ("nonsense", "unknown model 'nonsense'"),
        ("ollama:llama3.2", "use it with --backend ollama"),
        ("", "no model given"),
    ],
)
def test_bad_references_say_what_to_do(ref, match):
    with pytest.raises(ModelNotFound, match=match):
        resolve(ref)


def test_served_names_pass_through_for_server_backends():
    assert resolve("ollama:llama3.2", allow_served=True).served_name == "llama3.2"
    assert resolve("qwen2.5-7b-instruct", allow_served=True).kind == "served"


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="is not a .gguf file"):
        resolve(str(f))


def test_portable_config_copies_rope_base_to_the_top_level():
    cfg = portable_config({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    assert cfg["rope_theta"] == 100000.0 and "rope_scaling" not in cfg
    scaled = portable_config({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}})
    assert scaled["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}


@pytest.mark.slow
def test_converted_folder_is_complete_and_cached(smol):
    hf = Path(smol.hf_path)
    assert hf == converted_dir(Path(smol.gguf_path))
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 100000.0
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (hf / name).is_file(), name
    assert resolve("smollm2-135m").hf_path == str(hf)  # found again without converting
    assert any(r["hf_path"] == str(hf) for r in list_models())


def test_converted_folder_follows_the_gguf_content_not_its_path(tmp_path, monkeypatch):
    """Two checkouts (two venvs) holding the same GGUF share one converted folder; other bytes do not."""
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp_path / "cache"))
    a, b, c = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for path, body in ((a, b"GGUF same"), (b, b"GGUF same"), (c, b"GGUF other")):
        path.parent.mkdir()
        path.write_bytes(body)
    assert converted_dir(a) == converted_dir(b) != converted_dir(c)
    assert converted_dir(a).parent == tmp_path / "cache" / "converted"
