"""LoRA adapters between mlx-lm and PEFT: the same logits on both sides, exact round trips,
fusing, `generate --adapter`, and one-line refusals.

Every adapter here has a nonzero B (both libraries start it at zero, which would make any
conversion look right) and a scale that is not 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from localforge.adapters import as_format, convert, detect
from localforge.backends import fuse
from localforge.errors import ConfigError
from tests.helpers import run_cli

PROMPT = "The quick brown fox jumps over the lazy dog, twice."
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj"]
TOL = 1e-4


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Converted adapters go to a cache of this test's own, not the user's."""
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def prompt_ids(tiny_llama) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)(PROMPT)["input_ids"]


@pytest.fixture(scope="module")
def peft_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A PEFT LoRA on the last block only (rank 4, alpha 8: scale 2), with a random B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, layers_to_transform=[1],
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    out = tmp_path_factory.mktemp("adapters") / "peft"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def peft_logits(tiny_llama, peft_adapter, prompt_ids) -> np.ndarray:
    return torch_logits(tiny_llama, prompt_ids, peft_adapter)


def torch_logits(model_dir, ids, adapter=None) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.inference_mode():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def mlx_model(model_dir, adapter=None):
    mlx_lm = pytest.importorskip("mlx_lm")
    from localforge.backends.mlx.load import model_config

    return mlx_lm.load(str(model_dir), adapter_path=str(adapter) if adapter else None,
                       model_config=model_config(str(model_dir)))[0]


def mlx_logits(model, ids) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- PEFT -> MLX -----------------------------------------------------------------------------


def test_peft_to_mlx_gives_the_same_logits(tiny_llama, peft_adapter, peft_logits, prompt_ids, tmp_path):
    out = convert(peft_adapter, "mlx", tmp_path / "mlx")
    assert detect(out) == "mlx"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == 1 and config["fine_tune_type"] == "lora"
    assert config["lora_parameters"]["rank"] == 4 and config["lora_parameters"]["scale"] == 2.0
    assert sorted(config["lora_parameters"]["keys"]) == [
        "mlp.gate_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    tensors = load_tensors(out / "adapters.safetensors")
    assert tensors["model.layers.1.self_attn.q_proj.lora_a"].shape == (64, 4)  # [in, r]

    base = mlx_model(tiny_llama)
    adapted = mlx_model(tiny_llama, out)
    assert max_diff(mlx_logits(base, prompt_ids), peft_logits) > 1e-2  # the adapter matters
    assert max_diff(mlx_logits(adapted, prompt_ids), peft_logits) < TOL


# --- MLX -> PEFT -----------------------------------------------------------------------------


def test_round_trip_is_exact(peft_adapter, tmp_path):
    from peft import PeftConfig

    back = convert(convert(peft_adapter, "mlx", tmp_path / "mlx"), "peft", tmp_path / "back")
    original, again = load_tensors(peft_adapter / "adapter_model.safetensors"), load_tensors(
        back / "adapter_model.safetensors")
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert tensor.dtype == again[name].dtype and (tensor == again[name]).all(), name
    config = PeftConfig.from_pretrained(str(back))
    assert (config.r, config.lora_alpha, config.layers_to_transform) == (4, 8, [1])
    assert {t.split(".")[-1] for t in config.target_modules} == set(TARGETS)


def make_mlx_adapter(tiny_llama, out: Path, kind: str, num_layers: int, keys: list[str] | None):
    """An adapter as `mlx_lm lora` makes one: LoRA layers on the model, its trainable
    parameters saved, its arguments as the config. Returns the model (adapter applied)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = mlx_model(tiny_llama)
    model.freeze()
    params = {"rank": 4, "scale": 3.0, "dropout": 0.0, **({"keys": keys} if keys else {})}
    linear_to_lora_layers(model, num_layers, params, use_dora=kind == "dora")
    mx.random.seed(0)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.05
            if kind == "dora":
                module.m = module.m * (1 + 0.1 * mx.random.normal(module.m.shape))
    model.eval()
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"model": str(tiny_llama), "fine_tune_type": kind, "num_layers": num_layers,
              "lora_parameters": params, "batch_size": 4, "iters": 100, "learning_rate": 1e-5,
              "optimizer": "adam", "seed": 0, "train": True, "adapter_path": str(out)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=4))
    return model


@pytest.mark.parametrize("kind,num_layers,keys", [
    ("lora", 1, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]),
    ("dora", -1, None),  # every linear layer of every block
])
def test_mlx_native_adapter_to_peft_gives_the_same_logits(tiny_llama, prompt_ids, tmp_path, kind, num_layers, keys):
    pytest.importorskip("mlx_lm")
    model = make_mlx_adapter(tiny_llama, tmp_path / "mlx", kind, num_layers, keys)
    expected = mlx_logits(model, prompt_ids)
    assert max_diff(mlx_logits(mlx_model(tiny_llama, tmp_path / "mlx"), prompt_ids), expected) < 1e-6

    out = convert(tmp_path / "mlx", "peft", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] == (kind == "dora") and config["lora_alpha"] == 12
    assert config["layers_to_transform"] == ([1] if num_layers == 1 else None)
    assert max_diff(torch_logits(tiny_llama, prompt_ids), expected) > 1e-2
    assert max_diff(torch_logits(tiny_llama, prompt_ids, out), expected) < TOL


# --- fuse ------------------------------------------------------------------------------------


def test_fuse_gives_the_same_logits_and_keeps_embeddings_tied(tiny_llama, peft_adapter, peft_logits,
                                                              prompt_ids, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fused = fuse(peft_adapter, tmp_path / "fused")
    model = AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in load_tensors(fused / "model.safetensors")
    assert AutoTokenizer.from_pretrained(fused)(PROMPT)["input_ids"] == prompt_ids
    assert max_diff(torch_logits(fused, prompt_ids), peft_logits) < TOL

    # an mlx-lm adapter fuses the same (through PEFT), and mlx-lm loads the result
    mlx_adapter = convert(peft_adapter, "mlx", tmp_path / "mlx")
    fused_from_mlx = fuse(mlx_adapter, tmp_path / "fused-mlx")
    assert max_diff(torch_logits(fused_from_mlx, prompt_ids), peft_logits) < TOL
    assert max_diff(mlx_logits(mlx_model(fused_from_mlx), prompt_ids), peft_logits) < TOL


# --- backends and the CLI ----------------------------------------------------------------------


def test_cli_convert_and_generate_with_an_adapter(tiny_llama, peft_adapter, tmp_path):
    env = {"LOCALFORGE_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "mlx"
    done = run_cli("adapters", "convert", str(peft_adapter), "--to", "mlx", "-o", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and detect(out) == "mlx"

    done = run_cli("generate", "--backend", "torch", "--model", tiny_llama, "--adapter", str(out), "hi",
                   "--max-tokens", "5", "--verbose", env=env)
    assert done.returncode == 0, done.stderr
    assert "completion=" in done.stderr
    assert len(list((tmp_path / "cache" / "adapters").iterdir())) == 1  # converted to PEFT once


@pytest.mark.parametrize("command", [["adapters", "convert", "{bad}", "--to", "peft", "-o", "{out}"],
                                     ["adapters", "fuse", "{bad}", "-o", "{out}"],
                                     ["generate", "--backend", "torch", "--model", "{model}", "--adapter",
                                      "{bad}", "hi"]])
def test_cli_bad_adapter_is_one_line(tiny_llama, tmp_path, command):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"r": 4}')
    args = [a.format(bad=bad, out=tmp_path / "out", model=tiny_llama) for a in command]
    done = run_cli(*args)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and "adapter_config.json" in done.stderr


def test_backends_without_adapters_refuse_in_one_line(tiny_llama, peft_adapter):
    pytest.importorskip("llama_cpp")
    from localforge.backends import Unsupported, get_backend, resolve_auto

    with pytest.raises(Unsupported, match="llamacpp backend cannot load LoRA adapters") as info:
        get_backend("llamacpp", "no-such-model", adapter=str(peft_adapter))
    assert "\n" not in str(info.value)
    assert resolve_auto("smollm2-135m", adapter=True) in ("torch", "mlx")


def test_backend_generates_with_either_format(tiny_llama, peft_adapter, tmp_path):
    from localforge.backends import get_backend

    mlx_adapter = convert(peft_adapter, "mlx", tmp_path / "mlx")
    messages = [{"role": "user", "content": "hi"}]
    answers = []
    for adapter in (peft_adapter, mlx_adapter):
        with get_backend("torch", tiny_llama, adapter=str(adapter)) as backend:
            answers.append(backend.chat(messages, max_tokens=6).text)
            assert backend.adapter_key and backend.identity()[-1] == backend.adapter_key
    assert answers[0] == answers[1]


def test_mlx_backend_loads_a_peft_adapter(tiny_llama, peft_adapter):
    pytest.importorskip("mlx_lm")
    from localforge.backends import get_backend

    with get_backend("mlx", tiny_llama, adapter=str(peft_adapter)) as backend:
        assert backend.chat([{"role": "user", "content": "hi"}], max_tokens=4).completion_tokens >= 1


# --- refusals and formats ----------------------------------------------------------------------


def test_detect_refuses_what_is_not_an_adapter(tmp_path, peft_adapter):
    with pytest.raises(ConfigError, match="not a folder"):
        detect(tmp_path / "missing")
    with pytest.raises(ConfigError, match="has no adapter_config.json"):
        detect(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ConfigError, match="without adapter_model.safetensors"):
        detect(tmp_path)
    assert as_format(peft_adapter, "peft") == peft_adapter


def copy_with(peft_adapter: Path, out: Path, rename=None, extra=None, dtype=None, **config) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(peft_adapter, out)
    tensors = load_tensors(peft_adapter / "adapter_model.safetensors")
    tensors = {(rename(k) if rename else k): (v.to(dtype) if dtype else v) for k, v in tensors.items()}
    save_file({**tensors, **(extra or {})}, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return out


def test_refuses_what_has_no_mlx_equivalent(peft_adapter, tmp_path):
    import torch

    first_block = copy_with(peft_adapter, tmp_path / "first", rename=lambda k: k.replace(".1.", ".0."),
                            layers_to_transform=[0])
    with pytest.raises(ConfigError, match=r"not the last blocks of the 2-block base"):
        convert(first_block, "mlx", tmp_path / "o1")
    head = copy_with(peft_adapter, tmp_path / "head",
                     extra={"base_model.model.lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(ConfigError, match="unexpected tensor 'base_model.model.lm_head.weight'"):
        convert(head, "mlx", tmp_path / "o2")
    ranks = copy_with(peft_adapter, tmp_path / "ranks", rank_pattern={"q_proj": 8})
    with pytest.raises(ConfigError, match="'rank_pattern' is set"):
        convert(ranks, "mlx", tmp_path / "o3")
    with pytest.raises(ConfigError, match="already a PEFT adapter"):
        convert(peft_adapter, "peft", tmp_path / "o4")


def test_bfloat16_stays_bfloat16(peft_adapter, tmp_path):
    import torch

    bf16 = copy_with(peft_adapter, tmp_path / "bf16", dtype=torch.bfloat16)
    mlx = load_tensors(convert(bf16, "mlx", tmp_path / "mlx") / "adapters.safetensors")
    source = load_tensors(bf16 / "adapter_model.safetensors")
    a = mlx["model.layers.1.self_attn.q_proj.lora_a"]
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, source["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].T)


@pytest.fixture(scope="module")
def other_base(tiny_llama, tmp_path_factory) -> str:
    """A Llama of another width, with the same tokenizer: the adapter does not fit it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("other-base")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_an_adapter_for_another_base_is_a_one_line_error(other_base, peft_adapter, backend):
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    from localforge.backends import get_backend

    with pytest.raises(ConfigError, match="does not fit model") as info:
        get_backend(backend, other_base, adapter=str(peft_adapter))
    assert "\n" not in str(info.value)
