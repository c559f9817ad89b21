"""The torch engine on a tiny random Llama: learning, packing, accumulation and exact resume."""

from __future__ import annotations

import copy

import pytest

from localforge.backends.training import TrainSetup
from localforge.finetune.batches import as_rows, collate, encode_all, pack
from localforge.finetune.data import parse_row
from tests.helpers import TRAIN_ROWS, assert_same_loss_and_grads, through_both_attentions

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def seqs(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return tok, encode_all(tok, [parse_row(r) for r in TRAIN_ROWS], mask_prompt=True, max_len=128)


def trainer(path, **kw):
    from localforge.backends.torch.train import TorchTrainer

    kw.setdefault("targets", ["q_proj", "v_proj", "gate_proj"])
    return TorchTrainer(TrainSetup(model_path=path, rank=4, alpha=8, threads=1, **kw))


def test_packed_rows_have_the_loss_of_the_sequences_alone(tiny_llama, seqs):
    tok, enc = seqs
    t = trainer(tiny_llama)
    group = enc[:6]
    packed = collate(pack(group, 512), tok.pad_token_id)
    assert packed.packed and packed.input_ids.shape[0] == 1
    alone = [collate([[s]], tok.pad_token_id) for s in group]
    p_loss, p_tokens = t.eval_loss([packed])
    a_loss, a_tokens = t.eval_loss(alone)
    assert p_tokens == a_tokens == sum(sum(s.learn[1:]) for s in group)
    assert p_loss == pytest.approx(a_loss, rel=1e-6)
    # and the block mask is what makes it so: one attention span over the row gives another loss
    leaky = copy.deepcopy(packed)
    leaky.position_ids[:] = range(leaky.position_ids.shape[1])
    leaky.segment_ids[:] = 1
    assert abs(t.eval_loss([leaky])[0] - a_loss) > 1e-4 * a_loss  # a random model barely uses context


def test_learns_and_only_the_adapter_moves(tiny_llama, seqs):
    tok, enc = seqs
    t = trainer(tiny_llama, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    batch = collate([[s] for s in enc[:4]], tok.pad_token_id)
    losses = [t.step(i, [batch], 1e-2, batch.tokens) / batch.tokens for i in range(15)]
    # from a random start (10.8 nats, uniform over 49k tokens) a rank-4 adapter gains ~0.7 nats here
    assert losses[-1] < losses[0] - 0.4, losses
    assert all((p == base[n]).all() for n, p in t.model.named_parameters() if not p.requires_grad)


def test_accumulation_equals_one_big_batch(tiny_llama, seqs):
    tok, enc = seqs
    a, b = trainer(tiny_llama), trainer(tiny_llama)
    rows = [[s] for s in enc[:4]]
    whole = collate(rows, tok.pad_token_id)
    halves = [collate(rows[:2], tok.pad_token_id), collate(rows[2:], tok.pad_token_id)]
    assert a.step(0, [whole], 1e-3, whole.tokens) == pytest.approx(b.step(0, halves, 1e-3, whole.tokens), rel=1e-5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert (p - q).abs().max() < 1e-6, n


def test_resume_from_saved_state_continues_exactly(tiny_llama, seqs, tmp_path):
    tok, enc = seqs
    rows = as_rows(enc, packing=False, max_len=128, seed=0)
    batches = [collate(rows[i:i + 4], tok.pad_token_id) for i in range(0, 16, 4)]

    def run(t, steps):
        return [t.step(s, [batches[s]], 5e-3, batches[s].tokens) for s in steps]

    straight = run(trainer(tiny_llama, dropout=0.1), range(4))
    first = trainer(tiny_llama, dropout=0.1)
    run(first, range(2))
    first.save(tmp_path)
    second = trainer(tiny_llama, dropout=0.1, seed=123)  # a different seed: state must come from disk
    second.load(tmp_path)
    assert run(second, range(2, 4)) == pytest.approx(straight[2:], rel=1e-6)


@pytest.mark.parametrize("head_trains", [False, True])
def test_the_chunked_loss_is_torchs_cross_entropy_with_its_gradients(monkeypatch, head_trains):
    """Loss and gradients of ChunkedLinearCrossEntropy against cross_entropy over the whole logits,
    in fp64 over several chunks (exact up to summation order), and under CPU bf16 autocast."""
    import torch

    from localforge.backends import training
    from localforge.backends.torch.train import ChunkedLinearCrossEntropy

    monkeypatch.setattr(training, "CHUNK_LOGITS", 64 * 100)  # 64 rows a chunk: 5 chunks of 300 rows
    gen = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(300, 32, generator=gen, dtype=torch.float64), torch.randn(100, 32, generator=gen,
                                                                                      dtype=torch.float64)
    y = torch.randint(0, 100, (300,), generator=gen)

    def grads(fn, dtype, autocast=False):
        h, w = h0.to(dtype).clone().requires_grad_(), w0.to(dtype).clone().requires_grad_(head_trains)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, w)
        (loss * 3).backward()
        return float(loss), h.grad, w.grad

    def reference(h, w):
        return torch.nn.functional.cross_entropy((h @ w.t()).float(), y, reduction="sum")

    loss, gh, gw = grads(lambda h, w: ChunkedLinearCrossEntropy.apply(h, w, y), torch.float64)
    ref, rh, rw = grads(reference, torch.float64)
    assert loss == pytest.approx(ref, rel=1e-6)
    assert torch.allclose(gh, rh, atol=1e-5) and (gw is None) == (not head_trains)
    if head_trains:
        assert torch.allclose(gw, rw, atol=1e-4)
    loss, gh, _ = grads(lambda h, w: ChunkedLinearCrossEntropy.apply(h, w, y), torch.float32, autocast=True)
    ref, rh, _ = grads(reference, torch.float32, autocast=True)
    assert loss == pytest.approx(ref, rel=2e-3) and gh.dtype == torch.float32
    assert (gh - rh).abs().max() <= 0.02 * rh.abs().max()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_is_autocast_over_fp32_trainable_weights(tiny_llama, seqs, method):
    """bf16 on a CPU: the weights that train (and so their Adam states) stay fp32, a LoRA run's
    frozen base is bf16, and the loss is fp32's within bf16 rounding."""
    import torch

    tok, enc = seqs
    batch = collate(as_rows(enc[:4], packing=False, max_len=128, seed=0), tok.pad_token_id)
    half, full = trainer(tiny_llama, dtype="bf16", method=method), trainer(tiny_llama, dtype="fp32", method=method)
    assert half.autocast and {p.dtype for p in half.params} == {torch.float32}
    frozen = {p.dtype for p in half.model.parameters() if not p.requires_grad}
    assert frozen == ({torch.bfloat16} if method == "lora" else set())
    (h_loss, tokens), (f_loss, _) = half.eval_loss([batch]), full.eval_loss([batch])
    assert h_loss / tokens == pytest.approx(f_loss / tokens, rel=2e-2) and h_loss != f_loss
    before = half.eval_loss([batch])[0]
    for step in range(3):
        half.step(step, [batch], 1e-2 if method == "lora" else 1e-3, batch.tokens)
    assert half.eval_loss([batch])[0] < before


def test_sequence_bounds_cut_the_flattened_rows_at_each_sequence_and_each_rows_padding():
    import numpy as np

    from localforge.backends.torch.attention import sequence_bounds

    segments = np.array([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 2, 0, 0]], np.int32)
    bounds = sequence_bounds(segments, "cpu")
    assert bounds["cu_seq_lens_q"].tolist() == [0, 2, 5, 7, 11, 12, 14]
    assert bounds["cu_seq_lens_k"] is bounds["cu_seq_lens_q"] and bounds["max_length_q"] == 4


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_packed_attention_per_sequence_is_the_block_masks_loss_and_gradients(tiny_llama, seqs, monkeypatch, dtype):
    """A packed step (two rows of several sequences each, with padding) through localforge's
    per-sequence attention, against the same step through transformers' SDPA with the
    block-diagonal mask it builds from the positions: same loss, same adapter gradients. The
    per-sequence path really runs: once per layer, on every sequence of the batch (from any row
    width here: on a CPU it runs from ``CPU_PER_SEQUENCE_FROM``, 1024 tokens, by default)."""
    from localforge.backends.torch import attention

    tok, enc = seqs
    rows = pack(enc[:8], 200)
    batch = collate(rows[:2], tok.pad_token_id, width=256)
    assert batch.packed and (batch.segment_ids == 0).any(axis=1).all()  # padding ends each row
    t = trainer(tiny_llama, dtype=dtype)
    monkeypatch.setattr(attention, "CPU_PER_SEQUENCE_FROM", 256)
    ours, theirs, calls = through_both_attentions(t, batch, "_per_sequence", monkeypatch)
    sequences = sum(len(r) for r in rows[:2]) + 2  # and each row's padding
    assert calls == [sequences] * t.model.config.num_hidden_layers
    assert_same_loss_and_grads(ours, theirs, 1e-5 if dtype == "fp32" else 2e-2)


def test_packed_rows_shorter_than_the_cpu_threshold_keep_the_masked_kernels(tiny_llama, seqs, monkeypatch):
    """On a CPU, rows narrower than ``CPU_PER_SEQUENCE_FROM`` go through transformers' masked SDPA
    (faster there, measured): the per-sequence path is not called, and the loss and gradients
    are the masked pass's."""
    from localforge.backends.torch.attention import CPU_PER_SEQUENCE_FROM

    tok, enc = seqs
    batch = collate(pack(enc[:8], 200)[:2], tok.pad_token_id, width=256)
    assert batch.packed and batch.input_ids.shape[1] < CPU_PER_SEQUENCE_FROM
    ours, theirs, calls = through_both_attentions(trainer(tiny_llama), batch, "_per_sequence", monkeypatch)
    assert calls == []
    assert_same_loss_and_grads(ours, theirs, 1e-6)


def test_a_model_trained_with_packed_attention_saves_a_plain_config(tiny_llama, seqs, tmp_path):
    """The attention implementation localforge registers stays in the process: a full run's model
    folder loads anywhere, with transformers' own attention."""
    import json

    tok, enc = seqs
    t = trainer(tiny_llama, method="full")
    t.step(0, [collate(pack(enc[:6], 256), tok.pad_token_id)], 1e-3, 100)
    t.export(tmp_path / "model")
    assert "localforge" not in (tmp_path / "model" / "config.json").read_text()
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "llama"


def _documented_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, causal=False,
                       enable_gqa=False):
    """What torch.nn.attention.varlen_attn computes, per its documentation: [T, H, D] tensors,
    each sequence of ``cu_seq_q`` attending to itself alone (causal when asked)."""
    import torch

    assert cu_seq_q is cu_seq_k and max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    if key.shape[1] != query.shape[1]:
        assert enable_gqa, "several query heads share a key head only with enable_gqa"
    out = []
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        q, k, v = (x[a:b].transpose(0, 1)[None] for x in (query, key, value))
        out.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                                    enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(out)


def _varlen_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _documented_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal)


def _varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1)):
    return _documented_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                              causal=tuple(window_size) == (-1, 0))


def _varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    return _documented_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                              causal=tuple(window_size) == (-1, 0), enable_gqa=enable_gqa)


@pytest.mark.parametrize("kernel", [_varlen_2_9, _varlen_2_10, _varlen_2_12])
def test_the_flash_varlen_call_fits_each_torch_releases_signature(monkeypatch, kernel):
    """FlashAttention's varlen kernel runs on CUDA only, and its signature changed between torch
    2.9 (is_causal, no scale, no GQA), 2.10 (window_size, scale) and 2.12 (enable_gqa): here a
    stand-in with each release's signature that computes what the documentation says (the real
    kernel is checked against the masked SDPA by the CUDA test) takes localforge's call, and the
    result is the per-sequence attention's (grouped-query heads included)."""
    import inspect

    import numpy as np
    import torch

    from localforge.backends.torch import attention

    monkeypatch.setattr(attention, "_varlen", lambda: (kernel, frozenset(inspect.signature(kernel).parameters)))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 12, 8, generator=gen) for h in (4, 2, 2))
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 9 + [0] * 3], np.int32)
    bounds = attention.sequence_bounds(segments, "cpu")
    cu = bounds["cu_seq_lens_q"]
    want = attention._per_sequence(q, k, v, cu, 0.0, 8**-0.5)
    got = attention._flash_varlen(q, k, v, cu, bounds["max_length_q"], 8**-0.5)
    assert got.shape == want.shape == (2, 12, 4, 8)
    assert torch.allclose(got, want, atol=1e-6)


def test_models_load_without_hub_kernels_so_the_engines_own_survive_a_mode_change(tiny_llama):
    """transformers 5 would otherwise fetch kernels from the Hub (on CUDA) and re-kernelize at
    every train()/eval() switch, which drops a forward bound onto a layer (how Liger's kernels go
    in): the trainer's model says no hub kernels, and a bound forward outlives eval() and train()."""
    t = trainer(tiny_llama)
    base = t.model.get_base_model()
    assert base.use_kernels is False
    norm = base.model.norm
    norm.forward = type(norm).forward.__get__(norm)  # an instance's own forward, as Liger binds it
    bound = norm.__dict__["forward"]
    t.model.eval()
    t.model.train()
    assert norm.__dict__.get("forward") is bound
