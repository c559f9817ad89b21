"""The MLX trainer on a tiny random Llama: learning, packing, resume, accumulation, adapters mlx-lm loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytestmark = pytest.mark.slow  # trains a tiny model with the real tokenizer

from localforge.backends.training import Batch, TrainSetup  # noqa: E402
from localforge.errors import ConfigError  # noqa: E402
from localforge.finetune.batches import Schedule, as_rows, collate, encode_all  # noqa: E402
from localforge.finetune.data import parse_row  # noqa: E402
from tests.helpers import TRAIN_ROWS  # noqa: E402


@pytest.fixture(scope="module")
def data(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    seqs = encode_all(tok, [parse_row(r) for r in TRAIN_ROWS], mask_prompt=True, max_len=64)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return seqs, pad


def trainer(path, **kw):
    from localforge.backends.mlx.train import MLXTrainer

    return MLXTrainer(TrainSetup(model_path=path, **kw))


def params(t, trainable: bool | None = None) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    tree = t.model.trainable_parameters() if trainable else t.model.parameters()
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def test_loss_goes_down_and_only_the_adapter_changes(tiny_llama, data):
    seqs, pad = data
    batch = collate([[seqs[16]], [seqs[24]], [seqs[25]]], pad)  # a completion and two text rows
    t = trainer(tiny_llama, targets=["q_proj", "v_proj", "gate_proj"])
    before, adapter = params(t), set(params(t, trainable=True))
    assert adapter and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in adapter)
    assert t.trainable_params == sum(params(t, trainable=True)[k].size for k in adapter) < t.total_params
    losses = [t.step(i, [batch], 1e-2, batch.tokens) / batch.tokens for i in range(10)]
    # a random model with frozen tiny embeddings cannot go far below ln(vocab) ~ 10.8: 0.3 nats is clear progress
    assert losses[-1] < losses[0] - 0.3, losses
    after = params(t)
    for k, v in before.items():
        assert np.array_equal(v, after[k]) != (k in adapter), k  # the base is untouched, every adapter weight moved


def test_targets_and_layers(tiny_llama):
    t = trainer(tiny_llama, targets=["v_proj", "mlp.up_proj"], layers=1)
    names = set(params(t, trainable=True))
    assert {k.split(".lora")[0] for k in names} == {"model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"}
    with pytest.raises(ConfigError, match="'qkv' is not a linear layer"):
        trainer(tiny_llama, targets=["qkv"])


def test_packed_equals_unpacked(tiny_llama, data):
    seqs, pad = data
    seqs = seqs[14:20] + seqs[28:30]  # chat, completion and text rows
    packed = collate(as_rows(seqs, packing=True, max_len=64, seed=0), pad)
    assert packed.packed and packed.input_ids.shape[0] < len(seqs)
    t = trainer(tiny_llama)
    loss_packed, n_packed = t.eval_loss([packed])
    loss_one_by_one, n = t.eval_loss([collate([[s]], pad) for s in seqs])
    assert n_packed == n > 0
    assert loss_packed == pytest.approx(loss_one_by_one, rel=1e-4)
    # the same rows with segments merged get a plain causal mask: attention crosses sequences
    merged = Batch(packed.input_ids, packed.labels, (packed.segment_ids > 0).astype(np.int32), packed.position_ids)
    assert not merged.packed
    loss_merged, _ = t.eval_loss([merged])
    assert loss_merged != pytest.approx(loss_one_by_one, rel=1e-4)  # without the block mask the check above fails


def test_resume_replays_the_same_steps(tiny_llama, data, tmp_path):
    seqs, pad = data
    sched = Schedule(as_rows(seqs[12:], packing=True, max_len=56, seed=0), batch_size=1, grad_accum=2,
                     world_size=1, seed=0, pad_id=pad)
    setup = dict(dropout=0.05, weight_decay=0.01)

    def run(t, steps):
        return [t.step(s, sched.micro_batches(s), 5e-3, sched.step_tokens(s)) for s in steps]

    a = trainer(tiny_llama, **setup)
    losses_a = run(a, range(4))
    b = trainer(tiny_llama, **setup)
    assert run(b, range(2)) == losses_a[:2]
    b.save(tmp_path)
    b.close()
    c = trainer(tiny_llama, **setup)
    c.load(tmp_path)
    assert run(c, range(2, 4)) == pytest.approx(losses_a[2:], rel=1e-6)
    pa, pc = params(a, trainable=True), params(c, trainable=True)
    assert all(np.allclose(pa[k], pc[k], rtol=0, atol=1e-7) for k in pa)


def test_accumulation_equals_one_big_batch(tiny_llama, data):
    seqs, pad = data
    b1, b2 = collate([[s] for s in seqs[15:17]], pad), collate([[s] for s in seqs[22:25]], pad)
    both = collate([[s] for s in seqs[15:17] + seqs[22:25]], pad)
    tokens = b1.tokens + b2.tokens
    assert both.tokens == tokens
    x, y = trainer(tiny_llama, method="dora"), trainer(tiny_llama, method="dora")
    assert x.step(0, [b1, b2], 1e-2, tokens) == pytest.approx(y.step(0, [both], 1e-2, tokens), rel=1e-5)
    px, py = params(x, trainable=True), params(y, trainable=True)
    assert all(np.allclose(px[k], py[k], rtol=1e-5, atol=1e-6) for k in px)


def test_gradient_checkpointing_gives_the_same_step(tiny_llama, data):
    seqs, pad = data
    batch = collate(as_rows(seqs[15:19], packing=True, max_len=64, seed=0), pad)
    plain, ckpt = trainer(tiny_llama), trainer(tiny_llama, gradient_checkpointing=True)
    call = type(ckpt.model.layers[0]).__call__
    assert ckpt.step(0, [batch], 1e-2, batch.tokens) == pytest.approx(plain.step(0, [batch], 1e-2, batch.tokens), rel=1e-5)
    assert type(ckpt.model.layers[0]).__call__ is call  # the block class is restored after the step
    pp, pc = params(plain, trainable=True), params(ckpt, trainable=True)
    assert all(np.allclose(pp[k], pc[k], rtol=1e-5, atol=1e-6) for k in pp)


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_saved_adapter_or_model_loads_in_mlx_lm(tiny_llama, data, tmp_path, method):
    import json

    import mlx.core as mx
    import mlx_lm
    from mlx_lm.utils import load_model

    from localforge.backends.mlx.load import model_config

    seqs, pad = data
    batch = collate([[s] for s in seqs[15:18]], pad)
    t = trainer(tiny_llama, method=method, targets=["q_proj", "o_proj", "down_proj"], layers=1)
    for i in range(2):
        t.step(i, [batch], 1e-2, batch.tokens)
    info = t.export(tmp_path)
    assert info["trainable_params"] == t.trainable_params
    if method == "full":  # a model folder (weights, config, tokenizer), loaded like any model
        assert (info["kind"], info["format"]) == ("model", "hf") and (tmp_path / "tokenizer.json").exists()
        loaded, _ = mlx_lm.load(str(tmp_path), model_config=model_config(str(tmp_path)))
    else:
        assert (info["kind"], info["format"]) == ("adapter", "mlx")
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["fine_tune_type"] == method and config["num_layers"] == 1
        loaded, _ = mlx_lm.load(tiny_llama, model_config=model_config(tiny_llama), adapter_path=str(tmp_path))
    ids = mx.array(batch.input_ids)
    t.model.eval()
    expected = np.array(t.model(ids))
    assert np.allclose(np.array(loaded(ids)), expected, rtol=1e-5, atol=1e-5)
    base, _ = load_model(Path(tiny_llama), model_config=model_config(tiny_llama))
    assert not np.allclose(np.array(base(ids)), expected, rtol=1e-3, atol=1e-3)  # the adapter is not a no-op
