"""GRPO runs end to end: the run folder (manifest, metrics with the reward curve, checkpoints,
adapter, loss.png), exact resume, a reward that fails, and bad GRPO config, on torch (TRL) and
MLX (mlx-lm-lora).

One short run per engine uses the bundled SmolLM2-135M on GSM8K rows with exact match; resume
runs use the tiny random Llama (its completions are noise, so a length reward, which varies
between them, gives the gradient a signal: with only exact match every advantage would be 0 and
the weights would never move, and resume would be compared on nothing).
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from localforge.finetune.run import TrainingInterrupted, start, train
from tests.helpers import MODEL, assert_one_line, cli_main, write_jsonl
from tests.teach.atlas import GSM8K, gsm8k, needs_gsm8k

needs_mlx_lm_lora = pytest.mark.skipif(find_spec("mlx_lm_lora") is None or find_spec("mlx") is None,
                                       reason="mlx-lm-lora is not installed (pip install 'localforge[mlx]')")

CONFIG = """model: {model}
data: train.jsonl
method: grpo
backend: {backend}
steps: {steps}
batch_size: 1
grad_accum: {accum}
learning_rate: {lr}
seed: 5
save_every: {save}
grpo:
  rewards: {rewards}
  num_generations: 2
  max_completion_length: {tokens}
  beta: 0.04
output_dir: {out}
"""


def short_gsm8k(n: int = 4) -> list[dict]:
    """The shortest GSM8K questions of the first 300 (a step's cost grows with the prompt's tokens)."""
    return sorted(gsm8k(300), key=lambda r: len(r["question"]))[:n]


def project(tmp_path: Path, model: str, backend: str, *, steps=2, tokens=12, lr=1e-5, out="runs/g",
            rewards="[exact_match, {name: format, weight: 0.5}]", rows=None, accum=2, save=2) -> Path:
    rows = rows if rows is not None else (short_gsm8k() if GSM8K.is_file() else SIMPLE)
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = tmp_path / f"{backend}.yaml"
    cfg.write_text(CONFIG.format(model=model, backend=backend, steps=steps, tokens=tokens, lr=lr, out=out,
                                 rewards=rewards, accum=accum, save=save))
    return cfg


SIMPLE = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
          for a, b in [(2, 3), (10, 7), (4, 4), (12, 30)]]
NOISE_REWARDS = "[exact_match, {name: length, target: 40, weight: 1.0}]"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_run(run_dir: Path, manifest: dict, steps: int, names: list[str], weights: list[float]) -> None:
    assert manifest["status"] == "completed" and manifest["metrics"]["steps"] == steps
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        for name in names:
            assert 0.0 <= r[f"reward/{name}"] <= 1.0
        # the reward is the weighted sum of the rewards (each a mean over the step's completions)
        assert r["reward"] == pytest.approx(sum(w * r[f"reward/{n}"] for n, w in zip(names, weights, strict=True)), abs=1e-5)
        assert r["reward_std"] >= 0 and 1 <= r["completion_length"] <= 12 and r["tokens"] > 0
    assert manifest["metrics"]["final_reward"] == rows[-1]["reward"]
    assert manifest["config"]["grpo"]["num_generations"] == 2 and manifest["plan"]["num_generations"] == 2
    assert (run_dir / "adapter").is_dir() and manifest["output"]["kind"] == "adapter"
    png = run_dir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height = int.from_bytes(png.read_bytes()[20:24], "big")
    assert height > 600  # two panels: the loss and the reward curve (one panel is 440 px high)
    assert (run_dir / "checkpoints" / f"step-{steps:08d}" / "engine").is_dir()


@needs_gsm8k
@pytest.mark.slow
def test_grpo_on_the_bundled_model_torch(tmp_path, smol, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, _ = start(project(tmp_path, MODEL, "torch", accum=1))
    manifest = train(run.path)
    check_run(run.path, manifest, 2, ["exact_match", "format"], [1.0, 0.5])
    assert manifest["versions"]["trl"] and manifest["plan"]["backend"] == "torch"
    from localforge.adapters import detect

    assert detect(run.path / "adapter") == "peft"


@needs_mlx_lm_lora
@pytest.mark.slow
def test_grpo_on_the_bundled_model_mlx(tmp_path, smol, monkeypatch):
    """Short rows in GSM8K's answer format: a training step on mlx[cpu] costs about 1 s per prompt
    token of the group here (a GSM8K question is 150 tokens with the chat template)."""
    monkeypatch.chdir(tmp_path)
    run, _ = start(project(tmp_path, MODEL, "mlx", steps=1, tokens=6, accum=1, save=1, rows=SIMPLE))
    manifest = train(run.path)
    check_run(run.path, manifest, 1, ["exact_match", "format"], [1.0, 0.5])
    assert manifest["versions"]["mlx-lm-lora"]
    from localforge.adapters import detect

    assert detect(run.path / "adapter") == "mlx"


def _adapter_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = list(folder.glob("*.safetensors"))
    assert len(files) == 1
    return load_file(files[0])


@pytest.mark.parametrize("backend", ["torch", pytest.param("mlx", marks=needs_mlx_lm_lora)])
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_llama, backend, monkeypatch):
    """Four steps in one go, and two + two with a stop (as Ctrl-C) between: the same rewards,
    losses and samples per step, and the same trained adapter."""
    monkeypatch.chdir(tmp_path)
    cfg = project(tmp_path, tiny_llama, backend, steps=4, lr=5e-2, rewards=NOISE_REWARDS, rows=SIMPLE)
    whole, _ = start(cfg, ["output_dir=runs/whole"])
    train(whole.path)
    split, _ = start(cfg, ["output_dir=runs/split"])
    with pytest.raises(TrainingInterrupted):
        train(split.path, stop_after=2)
    assert json.loads((split.path / "manifest.json").read_text())["status"] == "interrupted"
    resumed = train(split.path)
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith("step-00000002")
    keys = ("loss", "reward", "reward_std", "reward/length", "completion_length", "tokens")
    a, b = metrics(whole.path), metrics(split.path)
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert len({r["reward/length"] for r in a}) > 1 or a[0]["reward_std"] > 0  # the samples differ: a signal
    ta, tb = _adapter_tensors(whole.path / "adapter"), _adapter_tensors(split.path / "adapter")
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=1e-5, atol=1e-6)
    moved = any(np.abs(v).max() > 0 for k, v in ta.items() if "lora_B" in k or k.endswith("lora_b"))
    assert moved, "no LoRA B matrix left zero: GRPO updated nothing"


def test_a_reward_that_raises_fails_the_run_naming_it(tmp_path, tiny_llama, monkeypatch, capsys):
    """json_fields on GSM8K answers (not JSON objects) raises inside the engine's step: the run is
    marked failed with the reward's name, and the command prints one line."""
    monkeypatch.chdir(tmp_path)
    cfg = project(tmp_path, tiny_llama, "torch", rewards="[exact_match, json_fields]", rows=SIMPLE)
    code, _, err = cli_main(monkeypatch, capsys, "finetune", str(cfg), "--no-progress")
    last = err.strip().splitlines()[-1]  # after the plan the command prints on stderr
    assert code == 1 and "Traceback" not in err and "unexpected" not in err, err
    assert last == ("error: reward 'json_fields' failed at step 1: ValueError: the 'answer' field must be a "
                    "non-empty JSON object for json_fields")
    # through the API the run folder stays, its manifest marked failed with that reason
    from localforge.finetune.rewards import RewardFailed

    run, _ = start(cfg, ["output_dir=runs/api"])
    with pytest.raises(RewardFailed):
        train(run.path)
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["reason"] == last.removeprefix("error: ")


@pytest.mark.parametrize("override, named", [
    (["grpo.rewards=[exact]"], "unknown reward 'exact'"),
    (["grpo.rewards=[{name: length, size: 3}]"], "has no option 'size'"),
    (["grpo.rewards=[teaching]"], "grpo.student"),
    (["grpo.num_generations=1"], "grpo.num_generations"),
    (["grpo.beta=-1"], "grpo.beta"),
    (["grpo.max_prompt_length=9"], "grpo.max_prompt_length"),
    (["grpo.max_completion_length=9000"], "context"),
    (["method=lora"], "grpo section is for method: grpo"),
    (["grpo.rewards=[{name: exact_match, answer_field: gold}]"], "no 'gold' field"),
    (["grpo.scale_rewards=maybe"], "grpo.scale_rewards"),
])
def test_bad_grpo_config_is_one_line_before_any_folder(tmp_path, tiny_llama, monkeypatch, capsys, override, named):
    monkeypatch.chdir(tmp_path)
    cfg = project(tmp_path, tiny_llama, "torch", rows=SIMPLE)
    code, _, err = cli_main(monkeypatch, capsys, "finetune", str(cfg), "--dry-run", *override)
    assert_one_line(code, err, 1, named)
    assert not (tmp_path / "runs").exists()


def test_bad_grpo_rows_are_named_by_line(tmp_path, tiny_llama, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = project(tmp_path, tiny_llama, "torch", rows=SIMPLE)
    for rows, named in [([SIMPLE[0], {"messages": [{"role": "user", "content": "hi"}]}], "line 2"),
                        ([{"question": "", "answer": "#### 1"}], "non-empty string"),
                        ([{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
                           "answer": "#### 1"}], "last message is the assistant's"),
                        ([{"question": "What is 1 + 1?"}], "no 'answer' field")]:
        write_jsonl(tmp_path / "train.jsonl", rows)
        code, _, err = cli_main(monkeypatch, capsys, "finetune", str(cfg), "--dry-run")
        assert_one_line(code, err, 1, "train.jsonl", named)
    assert not (tmp_path / "runs").exists()


def test_doctor_says_when_a_method_needs_a_package_this_machine_lacks():
    from localforge.backends import EngineSpec
    from localforge.commands.doctor import _methods_missing

    spec = EngineSpec(name="x", label="X", generate="m:C", requires=(), extra="x", runs_on="-",
                      methods=("lora", "grpo"), method_requires={"grpo": ("no_such_module_here",)},
                      method_packages={"grpo": ("no-such-dist",)})
    assert _methods_missing(spec) == {"grpo": "needs no-such-dist: pip install 'localforge[x]' (Python >= 3.11)"}
    assert _methods_missing(EngineSpec(name="y", label="Y", generate="m:C", requires=(), extra="", runs_on="-")) == {}


def test_full_grpo_writes_a_model_folder_and_keeps_a_reference(tmp_path, tiny_llama, monkeypatch):
    """grpo.train: full updates every weight (TRL loads a frozen reference for the KL) and the run's
    output is a model folder that loads like any HF folder."""
    monkeypatch.chdir(tmp_path)
    cfg = project(tmp_path, tiny_llama, "torch", steps=1, lr=1e-3, rewards=NOISE_REWARDS, rows=SIMPLE)
    run, _ = start(cfg, ["grpo.train=full"])
    manifest = train(run.path)
    assert manifest["status"] == "completed" and manifest["output"]["kind"] == "model"
    assert manifest["plan"]["lora_rank"] is None and (run.path / "model" / "config.json").is_file()
    from safetensors.numpy import load_file

    before = load_file(Path(tiny_llama) / "model.safetensors")
    after = load_file(run.path / "model" / "model.safetensors")
    changed = [k for k in before if k in after and not np.array_equal(before[k], after[k])]
    assert len(changed) > len(before) // 2  # most weights moved, not only an adapter


def test_a_grpo_run_exports_to_a_merged_folder_that_answers_like_base_plus_adapter(tmp_path, tiny_llama,
                                                                                   monkeypatch, capsys):
    """The run folder `finetune` wrote (not a hand-built one) is what `localforge export` reads."""
    from localforge.backends import get_backend
    from tests.helpers import MESSAGES

    monkeypatch.chdir(tmp_path)
    run, _ = start(project(tmp_path, tiny_llama, "torch", steps=2, lr=5e-2, rewards=NOISE_REWARDS, rows=SIMPLE))
    train(run.path)
    code, out, err = cli_main(monkeypatch, capsys, "export", str(run.path), "--to", "hf", "-o", "merged")
    assert code == 0, err
    assert Path(out.strip().splitlines()[-1]).resolve() == (tmp_path / "merged").resolve()

    def answer(model, **kw):
        with get_backend("torch", model, **kw) as be:
            return be.chat(MESSAGES, max_tokens=8, temperature=0.0).text

    adapted = answer(tiny_llama, adapter=str(run.path / "adapter"))
    assert answer(str(tmp_path / "merged")) == adapted
    assert answer(tiny_llama) != adapted  # GRPO moved the model: the comparison can fail


def _cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")


@pytest.mark.cuda
def test_grpo_on_cuda(tmp_path, monkeypatch):
    """On a GPU: bf16, sampling through transformers (or vLLM in colocate mode where installed), a
    random model with its own tokenizer (runs where the bundled model cannot travel)."""
    _cuda()
    from tests.helpers import make_offline_llama

    monkeypatch.chdir(tmp_path)
    model = make_offline_llama(tmp_path / "m", hidden=256, layers=4)
    run, _ = start(project(tmp_path, model, "torch", steps=2, lr=1e-3, rewards=NOISE_REWARDS, rows=SIMPLE))
    manifest = train(run.path)
    assert manifest["status"] == "completed" and manifest["plan"]["device"] == "cuda"
    assert manifest["plan"]["dtype"] in ("bf16", "fp16")


def test_the_offline_model_trains_grpo_here_too(tmp_path, monkeypatch):
    """The model the CUDA test builds (its own tokenizer, no bundled files) runs a GRPO step on the CPU."""
    from tests.helpers import make_offline_llama

    monkeypatch.chdir(tmp_path)
    model = make_offline_llama(tmp_path / "m")
    run, _ = start(project(tmp_path, model, "torch", steps=1, lr=1e-3, rewards=NOISE_REWARDS, rows=SIMPLE,
                           save=1, accum=1))
    assert train(run.path)["status"] == "completed"
