"""Packed rows: localforge's per-sequence attention against transformers' SDPA with the
block-diagonal mask, side by side in one process on the same batches.

The torch trainer (``localforge.backends.torch.train.TorchTrainer``, LoRA rank 8 on q_proj and
v_proj, the loop localforge runs) takes the same optimizer steps twice from the same start: once
with its own attention for packed rows (``localforge.backends.torch.attention``: causal SDPA per
sequence on a CPU, at every row width here, though training uses it from
``CPU_PER_SEQUENCE_FROM`` tokens only, the width this benchmark sets; FlashAttention's
variable-length kernel on CUDA) and once switched back to
transformers' ``sdpa``, which attends through the mask transformers builds from the position
ids. The rows are sequences of random length (``--min``..``--max`` tokens, real token ids)
packed by localforge's own packer into rows of ``--seq``, ``--batch`` rows a step, as
``packing: auto`` trains them.

Printed and written as JSON: tokens/s of each (median step after the first), their ratio, and
how far the two agree (largest relative difference of a step's loss; the steps are the same
optimizer steps, so the curves must match to float noise).

The model: on a CPU the bundled SmolLM2-135M (converted once by localforge) unless ``--shape``
names another; on CUDA a random-initialised model of ``--shape`` built on the device
(benchmarks/shapes.py), in bf16 autocast.

    python benchmarks/attention.py [--device cpu|cuda] [--shape smollm2-135m|llama-1b|PATH]
        [--seq 512] [--batch 4] [--steps 4] [--min 48] [--max 320] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

QUICK = {"seq": 256, "batch": 2, "steps": 3, "max": 160}


def _model(args, work: Path) -> str:
    if args.device == "cpu" and args.shape in (None, "bundled"):
        from localforge.backends import ensure_hf
        from localforge.models import resolve

        return str(ensure_hf(resolve("smollm2-135m")))
    from finetune import bench_texts
    from shapes import build

    return str(build(args.shape or "smollm2-135m", work / "model", device=args.device,
                     dtype="bf16" if args.device == "cuda" else "fp32", texts=bench_texts()))


def _batches(tokenizer, args) -> list:
    """``steps`` batches of packed rows, each of ``batch`` rows of at most ``seq`` tokens."""
    import numpy as np

    from localforge.finetune.batches import Encoded, collate, pack

    rng = np.random.default_rng(7)
    vocab = len(tokenizer)
    out = []
    for _ in range(args.steps):
        seqs = []
        while sum(len(s) for s in seqs) < args.batch * args.seq * 0.9:
            n = int(rng.integers(args.min, args.max + 1))
            ids = rng.integers(3, vocab, n).tolist()
            learn = [False] * (n // 4) + [True] * (n - n // 4)
            seqs.append(Encoded(ids, learn))
        rows = pack(seqs, args.seq)[:args.batch]
        out.append(collate(rows, tokenizer.pad_token_id or 0, max_len=args.seq))
    return out


def _run(trainer, batches, packed: bool) -> dict:
    import torch

    trainer.packed_attention = packed
    trainer.model.set_attn_implementation("localforge_packed" if packed else "sdpa")
    losses, rates = [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = trainer.step(i, [batch], 1e-4, batch.tokens)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(int((batch.segment_ids > 0).sum()) / (time.perf_counter() - t0))
        losses.append(loss / batch.tokens)
    return {"losses": losses, "tokens_per_s": statistics.median(rates[1:] or rates), "rates": rates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shape", default=None, help="smollm2-135m, llama-1b or a folder with a config.json")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--min", type=int, default=48)
    ap.add_argument("--max", type=int, default=320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a short run: " + json.dumps(QUICK))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/attention.json"))
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)

    import torch

    from localforge.backends.torch import attention
    from localforge.backends.torch.train import TorchTrainer
    from localforge.backends.training import TrainSetup

    # the per-sequence kernel at every width, so that the run measures where it pays on this CPU;
    # the trainer uses it from CPU_PER_SEQUENCE_FROM tokens (below, the masked kernels)
    threshold, attention.CPU_PER_SEQUENCE_FROM = attention.CPU_PER_SEQUENCE_FROM, 0

    with tempfile.TemporaryDirectory(prefix="lf-attn-") as tmp:
        path = _model(args, Path(tmp))
        dtype = "bf16" if args.device == "cuda" else "fp32"
        results = {}
        for name, packed in (("localforge", True), ("sdpa-mask", False)):
            trainer = TorchTrainer(TrainSetup(model_path=path, dtype=dtype, threads=args.threads, seed=0))
            if not trainer.packed_attention:
                raise SystemExit("this model does not run transformers' sdpa attention: nothing to compare")
            batches = _batches(trainer.tokenizer, args)
            results[name] = _run(trainer, batches, packed)
            trainer.close()
            del trainer
            if args.device == "cuda":
                torch.cuda.empty_cache()

    a, b = results["localforge"], results["sdpa-mask"]
    ratio = a["tokens_per_s"] / b["tokens_per_s"]
    loss_diff = max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"], strict=True))
    rows = [("localforge (per sequence)", a), ("transformers sdpa + mask", b)]
    print(f"packed rows: seq {args.seq}, batch {args.batch}, sequences {args.min}-{args.max} tokens, "
          f"{args.device}, {args.threads} threads, {dtype}")
    print(f"{'attention':<28}{'tok/s':>10}{'final loss':>12}")
    for label, r in rows:
        print(f"{label:<28}{r['tokens_per_s']:>10.1f}{r['losses'][-1]:>12.5f}")
    print(f"speed-up {ratio:.2f}x; largest relative loss difference {loss_diff:.2e}")
    if args.device == "cpu":
        print(f"(training on a CPU attends per sequence from rows of {threshold} tokens; "
              f"rows of {args.seq} {'do' if args.seq >= threshold else 'keep the masked kernels'})")
    from finetune import machine

    out = {"settings": vars(args) | {"out": str(args.out), "dtype": dtype},
           "cpu_per_sequence_from": threshold, "results": results,
           "speedup": ratio, "max_rel_loss_diff": loss_diff, "machine": machine(),
           "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
