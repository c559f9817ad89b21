"""`localforge export`: a run, an adapter or a model folder to a merged HF folder, a GGUF file or
an Ollama folder, with real parts: a PEFT LoRA on the bundled SmolLM2-135M whose greedy answer
differs from the base's, fused by torch, converted by llama.cpp's own converter, and answered by
torch, MLX and llama.cpp alike. One export per target is shared by the checks (module scope).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from localforge.errors import ConfigError
from tests.helpers import MESSAGES, assert_one_line, cli_main

TOKENS = 12
CHATML_GO = ('{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
             '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
             '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
             '{{ end }}{{ end }}<|im_start|>assistant\n')


def greedy(backend_name: str, model: str, adapter: str | None = None) -> str:
    from localforge.backends import get_backend

    with get_backend(backend_name, model, **({"adapter": adapter} if adapter else {})) as be:
        return be.chat(MESSAGES, max_tokens=TOKENS, temperature=0.0).text


def gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
              or k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id")}
    fields["tensor_types"] = {t.tensor_type.name for t in reader.tensors}
    return fields


@pytest.fixture(scope="module")
def converter_ready():
    """llama.cpp's converter for the installed llama-cpp-python, set up as `localforge export setup`
    does (pip's cache makes a repeat offline)."""
    from localforge.backends import install_converter

    return install_converter()


@pytest.fixture(scope="module")
def hf_base(smol) -> Path:
    return Path(smol.hf_path)


ANSWER = "Paris, the City of Light, is the capital of France."


@pytest.fixture(scope="module")
def trained(hf_base, tmp_path_factory) -> dict:
    """A real PEFT LoRA on the real base, trained for three steps to give a new answer (rank 8 on
    q/v/o of the last eight blocks, so a step is quick), saved naming its base; and the greedy
    answers of the base and of base + adapter, from PEFT itself (the adapter unmerged)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_base)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = tok(prompt + ANSWER + "<|im_end|>\n", return_tensors="pt", add_special_tokens=False)["input_ids"]
    labels = ids.clone()
    labels[:, :prompt_ids.shape[1]] = -100
    model = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    torch.manual_seed(0)  # LoRA's A matrices: the same whatever ran before in this process
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                                  layers_to_transform=list(range(22, 30)), lora_dropout=0.0,
                                                  task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()

    def answer() -> str:
        with torch.no_grad():
            out = peft_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=TOKENS,
                                      do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True)

    adapted = answer()
    with peft_model.disable_adapter():
        base = answer()
    assert base != adapted, (base, adapted)  # the adapter matters, or parity would prove nothing
    assert adapted.startswith("Paris, the City of Light"), adapted
    out = tmp_path_factory.mktemp("export-adapter") / "adapter"
    peft_model.save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf_base)
    return {"path": out, "base": base, "adapted": adapted}


@pytest.fixture(scope="module")
def adapter(trained) -> Path:
    return trained["path"]


@pytest.fixture(scope="module")
def answers(trained) -> dict:
    return trained


def make_run(folder: Path, adapter: Path, hf_base: Path, status: str = "completed") -> Path:
    """A run folder as `finetune` leaves one (run.json, manifest.json, adapter/)."""
    folder.mkdir(parents=True)
    shutil.copytree(adapter, folder / "adapter")
    (folder / "run.json").write_text(json.dumps({"model_path": str(hf_base), "plan": {}, "data_files": {}}))
    (folder / "manifest.json").write_text(json.dumps({"status": status, "model_path": str(hf_base),
                                                      "reason": "" if status == "completed" else "Ctrl-C"}))
    return folder


@pytest.fixture(scope="module")
def exported(adapter, hf_base, converter_ready, tmp_path_factory) -> dict:
    """A run exported to hf, and that merged folder (a plain model folder) exported to gguf f16."""
    from localforge.export import export, plan

    root = tmp_path_factory.mktemp("exported")
    run = make_run(root / "run", adapter, hf_base)
    hf = export(plan(run, "hf", root / "merged"))
    gguf = export(plan(hf.path, "gguf", root / "merged-f16.gguf"))
    return {"root": root, "hf": hf, "gguf": gguf}


@pytest.mark.slow
def test_merged_folder_answers_like_base_plus_adapter_on_torch_and_mlx(exported, answers, hf_base):
    merged = exported["hf"].path
    assert sorted(p.name for p in exported["root"].iterdir()) == ["merged", "merged-f16.gguf", "run"]  # no temp left
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert (merged / "chat_template.jinja").read_text() == (hf_base / "chat_template.jinja").read_text()
    assert greedy("torch", str(merged)) == answers["adapted"]
    pytest.importorskip("mlx_lm")
    assert greedy("mlx", str(merged)) == answers["adapted"]


@pytest.mark.slow
def test_gguf_keeps_tokenizer_and_template_and_answers_like_the_merged_folder(exported, answers, smol):
    path = exported["gguf"].path
    assert exported["gguf"].gguf == path and path.suffix == ".gguf"
    fields = gguf_fields(path)
    bundled = gguf_fields(Path(smol.gguf_path))
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == 1  # MOSTLY_F16, and the tensors say so too
    assert fields["tensor_types"] == {"F16", "F32"}  # norms stay F32
    assert fields["tokenizer.ggml.model"] == bundled["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == bundled["tokenizer.ggml.pre"]
    assert fields["tokenizer.ggml.eos_token_id"] == bundled["tokenizer.ggml.eos_token_id"]
    assert fields["tokenizer.chat_template"] == (exported["hf"].path / "chat_template.jinja").read_text()
    assert greedy("llamacpp", str(path)) == answers["adapted"]


@pytest.mark.slow
def test_cli_exports_to_an_ollama_folder(exported, answers, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    out = tmp_path / "My Model"
    merged = os.path.relpath(exported["hf"].path, tmp_path)
    code, stdout, err = cli_main(monkeypatch, capsys, "export", merged, "--to", "ollama", "-o", "My Model",
                                 "--quant", "q8_0")
    assert code == 0, err
    modelfile = out / "Modelfile"
    assert stdout.splitlines() == [str(out), f"ollama create my-model -f '{modelfile}'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["My Model"]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "my-model-q8_0.gguf"]
    text = modelfile.read_text()
    assert text.startswith("FROM ./my-model-q8_0.gguf\n")
    assert f'TEMPLATE """{CHATML_GO}"""\n' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n' in text
    assert [line for line in text.splitlines() if line.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    assert "PARAMETER num_ctx 8192" in text
    gguf = out / "my-model-q8_0.gguf"
    fields = gguf_fields(gguf)
    assert fields["general.file_type"] == 7 and "Q8_0" in fields["tensor_types"]  # MOSTLY_Q8_0
    assert greedy("llamacpp", str(gguf)) == answers["adapted"]


@pytest.mark.slow
def test_sources_are_told_apart(adapter, hf_base, tmp_path):
    from localforge.export import find_source

    run = find_source(make_run(tmp_path / "run", adapter, hf_base))
    assert (run.kind, run.adapter, run.base) == ("run", (tmp_path / "run" / "adapter").resolve(), str(hf_base))
    alone = find_source(adapter)
    assert (alone.kind, alone.adapter, alone.base) == ("adapter", adapter.resolve(), str(hf_base))
    assert find_source(adapter, base="other").base == "other"
    model = find_source(hf_base)
    assert (model.kind, model.model_dir, model.adapter) == ("model", hf_base.resolve(), None)
    full = tmp_path / "full-run"
    full.mkdir()
    (full / "model").mkdir()
    for f in hf_base.iterdir():
        (full / "model" / f.name).symlink_to(f)
    (full / "run.json").write_text(json.dumps({"model_path": str(hf_base)}))
    (full / "manifest.json").write_text(json.dumps({"status": "completed"}))
    assert find_source(full).model_dir == (full / "model").resolve()


def test_an_interrupted_export_leaves_nothing_at_out(hf_base, converter_ready, tmp_path, monkeypatch):
    import localforge.backends as backends
    from localforge.export import export, plan

    def cut(model_dir, out, quant, on_event):
        Path(out).write_bytes(b"GGUF half")
        raise KeyboardInterrupt

    monkeypatch.setattr(backends, "to_gguf", cut)
    p = plan(hf_base, "ollama", tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        export(p)
    assert list(tmp_path.iterdir()) == []


# --- the Modelfile's TEMPLATE ---------------------------------------------------------------------

# A Llama-3-shaped template (header, content, <|eot_id|>; BOS through the variable).
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Llama-2-shaped: the system prompt folded into the first user turn.
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
          "{% elif m['role'] == 'user' %}[INST] {% if sys is defined and loop.index == 2 %}<<SYS>>\n{{ sys }}\n"
          "<</SYS>>\n\n{% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}"
          "{% endif %}{% endfor %}")


def chat_folder(tmp_path: Path, template: str | None, **tok) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>", **tok}))
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 1, "content": "<|begin_of_text|>", "special": True},
        {"id": 2, "content": "<|eot_id|>", "special": True},
        {"id": 3, "content": "<|start_header_id|>", "special": True}]}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "temperature": 0.6, "top_p": 0.9}))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def test_llama3_shape_translates_to_a_go_template(tmp_path):
    from localforge.export.modelfile import chat_shape, modelfile

    folder = chat_folder(tmp_path, LLAMA3)
    shape = chat_shape(folder)
    assert shape.bos and shape.default_system is None
    assert shape.go_template() == (
        '{{ range .Messages }}{{ if eq .Role "system" }}<|start_header_id|>system<|end_header_id|>\n\n'
        '{{ .Content }}<|eot_id|>{{ else if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n'
        '{{ .Content }}<|eot_id|>{{ else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>'
        '\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
    text = modelfile("m.gguf", shape, folder)
    assert [line for line in text.splitlines() if line.startswith("PARAMETER")] == [
        'PARAMETER stop "<|eot_id|>"', 'PARAMETER stop "<|start_header_id|>"',
        "PARAMETER temperature 0.6", "PARAMETER top_p 0.9"]
    assert "SYSTEM" not in text


def test_smollm2_template_rebuilds_every_probe(hf_base):
    from localforge.export.modelfile import _probes, _renderer, chat_shape, read_template

    shape = chat_shape(hf_base)
    assert shape.go_template() == CHATML_GO
    template, tok_cfg = read_template(hf_base)
    render = _renderer(template, tok_cfg, hf_base)
    for messages, gen in _probes():
        assert shape.render([{"role": r, "content": c} for r, c in messages], gen) == render(messages, gen)


@pytest.mark.parametrize(("template", "named"), [
    (LLAMA2, "does not write each message on its own"),
    (None, "has no chat template"),
    ("{% for m in messages %}{{ raise_exception('no') }}{% endfor %}", "refuses a system/user conversation"),
    ("{% for m in messages %}", "is not valid Jinja"),
    ('{{ messages[0]["content"] }}"""', "does not write each message on its own"),
])
def test_unsupported_templates_fail_in_one_line(tmp_path, template, named):
    from localforge.export.modelfile import chat_shape

    with pytest.raises(ConfigError) as caught:
        chat_shape(chat_folder(tmp_path, template))
    message = str(caught.value)
    assert named in message and "\n" not in message


# --- bad input: one line, nothing written -------------------------------------------------------------


@pytest.fixture
def bad_sources(tmp_path, hf_base) -> dict:
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "notes.txt").write_text("hi")
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "run.json").write_text(json.dumps({"model_path": str(hf_base)}))
    (stopped / "manifest.json").write_text(json.dumps({"status": "interrupted", "reason": "Ctrl-C"}))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    return {"missing": str(tmp_path / "nope"), "nothing": str(nothing), "broken": str(broken),
            "stopped": str(stopped), "model": str(hf_base), "full": str(full), "file": str(nothing / "notes.txt")}


@pytest.mark.parametrize(("args", "code", "named"), [
    (["{missing}", "--to", "hf", "-o", "{out}"], 1, ["{missing}", "does not exist"]),
    (["{file}", "--to", "hf", "-o", "{out}"], 1, ["{file}", "not a folder"]),
    (["{nothing}", "--to", "hf", "-o", "{out}"], 1, ["{nothing}", "neither"]),
    (["{broken}", "--to", "hf", "-o", "{out}"], 1, ["adapter_config.json", "corrupt"]),
    (["{stopped}", "--to", "gguf", "-o", "{out}.gguf"], 1, ["status 'interrupted'", "finetune resume"]),
    (["{model}", "--to", "zip", "-o", "{out}"], 2, ["--to", "hf, gguf, ollama"]),
    (["{model}", "--to", "gguf", "--quant", "q3_x", "-o", "{out}.gguf"], 2, ["--quant", "q8_0"]),
    (["{model}", "--to", "hf", "--quant", "q8_0", "-o", "{out}"], 2, ["--quant"]),
    (["{model}", "--to", "gguf", "-o", "{out}"], 2, ["-o", ".gguf"]),
    (["{model}", "--to", "hf", "-o", "{full}"], 1, ["-o", "not empty"]),
    (["{model}", "--to", "ollama", "--name", "Bad Name", "-o", "{out}"], 2, ["--name"]),
    (["{model}", "--to", "hf", "--base", "{model}", "-o", "{out}"], 2, ["--base"]),
    (["{model}", "--to", "hf"], 2, ["--output"]),
])
def test_bad_input_is_one_line_and_writes_nothing(bad_sources, tmp_path, args, code, named, monkeypatch, capsys):
    values = {**bad_sources, "out": str(tmp_path / "out")}
    before = sorted(tmp_path.iterdir())
    got, _, err = cli_main(monkeypatch, capsys, "export", *[a.format(**values) for a in args])
    assert_one_line(got, err, code, *[n.format(**values) for n in named])
    assert sorted(tmp_path.iterdir()) == before


def test_a_missing_converter_says_what_to_run(hf_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp_path / "empty-cache"))
    for to, out in (("gguf", "x.gguf"), ("ollama", "x")):
        code, _, err = cli_main(monkeypatch, capsys, "export", str(hf_base), "--to", to, "-o", str(tmp_path / out))
        assert_one_line(code, err, 1, "converter", "localforge export setup")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_setup_refuses_a_file_that_is_not_the_sdist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "llama_cpp_python-0.0.1.tar.gz"
    bad.write_bytes(b"not a tarball")
    code, _, err = cli_main(monkeypatch, capsys, "export", "setup", "--sdist", str(bad))
    assert_one_line(code, err, 1, "--sdist", "llama_cpp_python-")


@pytest.mark.slow
def test_an_architecture_the_converter_lacks_is_one_line(converter_ready, tmp_path, monkeypatch, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    model = tmp_path / "nope-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NopeForCausalLM"], "model_type": "nope"}))
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(model / "model.safetensors"))
    code, _, err = cli_main(monkeypatch, capsys, "export", str(model), "--to", "gguf", "-o", str(tmp_path / "x.gguf"))
    assert_one_line(code, err, 1, "converter", "NopeForCausalLM is not supported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nope-model"]
