"""Prompt masking, packing and the data order, with the real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localforge.backends.training import IGNORE
from localforge.finetune.batches import (
    Encoded,
    Schedule,
    as_rows,
    collate,
    encode,
    encode_all,
    pack,
)
from localforge.finetune.config import FinetuneConfig
from localforge.finetune.data import parse_row
from localforge.finetune.run import lr_at


@pytest.fixture(scope="module")
def tok(smol):
    from transformers import AutoTokenizer

    from localforge.backends import ensure_hf

    return AutoTokenizer.from_pretrained(ensure_hf(smol))


def learned(tok, enc: Encoded) -> str:
    return tok.decode([i for i, keep in zip(enc.ids, enc.learn, strict=True) if keep])


def test_chat_rows_learn_every_assistant_turn_and_nothing_else(tok):
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}]}
    enc = encode(tok, parse_row(row))
    assert learned(tok, enc) == "Hello!<|im_end|>\n4<|im_end|>\n"
    assert tok.decode(enc.ids).count("Be brief.") == 1
    assert all(enc.learn[1:]) is False and all(encode(tok, parse_row(row), mask_prompt=False).learn)


def test_completion_and_text_rows(tok):
    comp = encode(tok, parse_row({"prompt": "2+2=", "completion": "4"}))
    assert learned(tok, comp) == "4<|im_end|>" and tok.decode(comp.ids) == "2+2=4<|im_end|>"
    text = encode(tok, parse_row({"text": "hello world"}))
    assert learned(tok, text) == "hello world<|im_end|>"


def test_a_row_with_nothing_to_learn_after_cutting_names_its_row(tok):
    rows = [parse_row({"prompt": "a long prompt " * 20, "completion": "x"})]
    with pytest.raises(Exception, match=r"train.jsonl row 1: nothing left to learn .* max_seq_length=16"):
        encode_all(tok, rows, mask_prompt=True, max_len=16, where="train.jsonl")


def _labels_alone(seq: Encoded) -> list[int]:
    return [t if keep else IGNORE for t, keep in zip(seq.ids[1:], seq.learn[1:], strict=True)] + [IGNORE]


seqs_strategy = st.lists(
    st.lists(st.tuples(st.integers(3, 999), st.booleans()), min_size=1, max_size=40).map(
        lambda xs: Encoded([x for x, _ in xs], [b for _, b in xs])), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(seqs=seqs_strategy, max_len=st.integers(40, 120))
def test_packed_labels_are_each_sequences_own_labels(seqs, max_len):
    """Packing with prompt masking: every label is the one the sequence has alone; none crosses over."""
    rows = pack(seqs, max_len)
    assert sorted(map(id, (s for r in rows for s in r))) == sorted(map(id, seqs))
    batch = collate(rows, pad_id=0)
    for b, row in enumerate(rows):
        t = 0
        for k, seq in enumerate(row, 1):
            n = len(seq)
            assert batch.labels[b, t:t + n].tolist() == _labels_alone(seq)
            assert (batch.segment_ids[b, t:t + n] == k).all() and batch.position_ids[b, t:t + n].tolist() == list(range(n))
            t += n
        assert (batch.labels[b, t:] == IGNORE).all() and (batch.segment_ids[b, t:] == 0).all()
    assert batch.tokens == sum(sum(s.learn[1:]) for s in seqs)


def _schedule(world: int, batch: int, accum: int, n: int = 20) -> Schedule:
    rows = [[Encoded([5] * (i + 2), [False] + [True] * (i + 1))] for i in range(n)]
    return Schedule(rows, batch, accum, world, seed=1, pad_id=0)


def test_processes_and_accumulation_see_the_same_rows_per_step():
    one, two, accum = _schedule(1, 4, 1), _schedule(2, 2, 1), _schedule(1, 2, 2)
    for step in range(12):  # crosses epoch boundaries (20 rows, 4 per step)
        ids = [len(r[0]) for r in one.step_rows(step)]
        assert ids == [len(r[0]) for r in two.step_rows(step)] == [len(r[0]) for r in accum.step_rows(step)]
        got = sorted(int(n) for r in (0, 1) for b in two.micro_batches(step, r) for n in (b.labels != IGNORE).sum(axis=1))
        assert got == sorted(n - 1 for n in ids)
        assert one.step_tokens(step) == sum(n - 1 for n in ids)
    epoch = [len(r[0]) for s in range(5) for r in one.step_rows(s)]
    assert sorted(epoch) == list(range(2, 22))  # each row once per epoch
    assert epoch != [len(r[0]) for s in range(5, 10) for r in one.step_rows(s)]  # a new order each epoch
    assert one.steps_for_epochs(2.5) == 13


def test_packing_order_is_seeded():
    seqs = [Encoded([1] * (n % 7 + 2), [True] * (n % 7 + 2)) for n in range(30)]
    assert [[len(s) for s in r] for r in as_rows(seqs, True, 16, 0)] == [[len(s) for s in r] for r in as_rows(seqs, True, 16, 0)]
    assert all(sum(len(s) for s in r) <= 16 for r in as_rows(seqs, True, 16, 0))
    assert len(as_rows(seqs, False, 16, 0)) == 30


def test_learning_rate_schedules():
    cfg = FinetuneConfig(data="x", learning_rate=1.0, warmup_steps=2, lr_schedule="cosine")
    lrs = [lr_at(s, 10, cfg) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] < 0.05 and np.all(np.diff(lrs[2:]) <= 0)
    assert lr_at(6, 10, cfg.model_copy(update={"lr_schedule": "linear"})) == pytest.approx(0.5)
    assert lr_at(9, 10, cfg.model_copy(update={"lr_schedule": "constant"})) == 1.0


def test_batch_widths_come_from_a_small_fixed_set():
    from localforge.finetune.batches import BUCKETS, bucket

    for max_len in (16, 100, 256, 512, 2048, 4096):
        widths = {bucket(n, max_len) for n in range(1, max_len + 1)}
        assert len(widths) <= BUCKETS and max(widths) == max_len, max_len
        assert all(bucket(n, max_len) >= n for n in range(1, max_len + 1))
    assert bucket(70, 512) == 128 and bucket(513, 512) == 513  # an uncut row is never narrowed
    enc = [Encoded(list(range(n)), [True] * n) for n in (30, 70)]
    assert collate([[e] for e in enc], 0, max_len=512).input_ids.shape == (2, 128)
    assert collate([[e] for e in enc], 0).input_ids.shape == (2, 72)  # no max_len: multiples of 8
