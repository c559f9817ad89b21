"""An engine added by a spec alone: registered here, pointing at a trainer defined here, then
planned, chosen by ``auto``, run, checkpointed and resumed by ``finetune`` with no other file changed.

The engine is real, if small: a unigram model in numpy (one logit per vocabulary entry, trained
by gradient descent on the same summed token loss as the real engines). It stands in for any
engine someone adds; nothing about it is known to ``finetune/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from localforge.backends import REGISTRY, EngineSpec
from localforge.backends.training import IGNORE, Batch, TrainSetup
from localforge.errors import ConfigError

SPEC = EngineSpec(
    name="unigram", label="Unigram", extra="", runs_on="anywhere (numpy)",
    generate="tests.backends.test_base:Echo", requires=("numpy",), devices=("cpu",), rank=-1,
    trainer="tests.finetune.test_fake_engine:UnigramTrainer", methods=("lora",),
    runtime_bytes={"cpu": 0}, packages=("numpy",),
)

CONFIG = """model: {model}
data: data/
lora: {{rank: 4, alpha: 8}}
steps: 6
batch_size: 2
grad_accum: 2
learning_rate: 40.0
max_seq_length: 128
eval_every: 3
save_every: 2
output_dir: runs/{name}
"""


class UnigramTrainer:
    rank, world_size = 0, 1

    def __init__(self, setup: TrainSetup):
        from localforge.backends.hf import load_tokenizer

        self.tokenizer = load_tokenizer(setup.model_path)
        self.logits = np.zeros(len(self.tokenizer))
        self.trainable_params = self.total_params = self.logits.size

    def _counts(self, batches: list[Batch]) -> np.ndarray:
        labels = np.concatenate([b.labels.reshape(-1) for b in batches])
        return np.bincount(labels[labels != IGNORE], minlength=self.logits.size).astype(float)

    def _log_probs(self) -> np.ndarray:
        z = self.logits - self.logits.max()
        return z - np.log(np.exp(z).sum())

    def step(self, step: int, micro_batches: list[Batch], lr: float, step_tokens: int) -> float:
        counts, logp = self._counts(micro_batches), self._log_probs()
        self.logits -= lr * (counts.sum() * np.exp(logp) - counts) / max(1, step_tokens)
        return float(-(counts * logp).sum())

    def eval_loss(self, batches: list[Batch]) -> tuple[float, int]:
        counts = self._counts(batches)
        return float(-(counts * self._log_probs()).sum()), int(counts.sum())

    def save(self, folder: Path) -> None:
        np.save(Path(folder) / "unigram.npy", self.logits)

    def load(self, folder: Path) -> None:
        self.logits = np.load(Path(folder) / "unigram.npy")

    def export(self, out: Path) -> dict:
        Path(out).mkdir(parents=True, exist_ok=True)
        self.save(out)
        return {"format": "unigram", "path": str(out)}

    def sync(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        self.logits = None


@pytest.fixture
def project(tmp_path, train_data, tiny_llama, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("straight", "split"):
        (tmp_path / f"{name}.yaml").write_text(CONFIG.format(model=tiny_llama, name=name))
    return tmp_path


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_an_engine_registered_as_a_spec_is_planned_chosen_run_and_resumed(project, monkeypatch):
    from localforge.finetune.run import TrainingInterrupted, prepare, start, train

    monkeypatch.setitem(REGISTRY, SPEC.name, SPEC)
    _, _, _, _, plan = prepare(project / "straight.yaml")
    assert (plan.backend, plan.device) == ("unigram", "cpu")  # chosen by auto, before torch and mlx
    assert "backend unigram (Unigram on the CPU)" in plan.reasons

    straight, _ = start(project / "straight.yaml")
    events = []
    manifest = train(straight.path, on_event=lambda kind, **data: events.append(kind))
    assert manifest["status"] == "completed" and manifest["config"]["backend"] == "unigram"
    assert manifest["adapter"]["format"] == "unigram" and (straight.adapter / "unigram.npy").is_file()
    assert set(manifest["versions"]) == {"python", "localforge", "numpy"}  # the packages its spec names
    curve = losses(straight.path)
    assert curve[6] < curve[1] - 1.0  # it learns: the unigram moves towards the data's tokens
    assert events.count("step") == 6 and events.count("eval") == 2 and events.count("checkpoint") == 3
    ckpt = straight.latest()
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "engine" / "unigram.npy").is_file()

    split, _ = start(project / "split.yaml")
    with pytest.raises(TrainingInterrupted, match="stopped at step 3 of 6"):
        train(split.path, stop_after=3)
    assert train(split.path)["resumed_from"].endswith("step-00000003")
    assert losses(split.path) == pytest.approx(curve, rel=1e-9)


def test_the_config_accepts_a_registered_engine_and_names_the_others(project, monkeypatch):
    from localforge.finetune.config import load_config

    with pytest.raises(ConfigError, match=r"config key 'backend': expected 'auto', .*'torch'.* got 'unigram'"):
        load_config(project / "straight.yaml", ["backend=unigram"])
    monkeypatch.setitem(REGISTRY, SPEC.name, SPEC)
    assert load_config(project / "straight.yaml", ["backend=unigram"]).backend == "unigram"
    from localforge.finetune.run import prepare

    with pytest.raises(ConfigError, match="config key 'method': backend 'unigram' trains lora, not 'full'"):
        prepare(project / "straight.yaml", ["backend=unigram", "method=full"])
    with pytest.raises(ConfigError, match="num_processes=2: Unigram trains in one process here"):
        prepare(project / "straight.yaml", ["backend=unigram", "num_processes=2"])
