"""Fine-tuning speed and memory: localforge against TRL, a raw peft loop and mlx_lm.lora, in one run.

Every contender trains the bundled SmolLM2-135M with the same LoRA (rank 8, alpha 16, dropout
0, q_proj + v_proj, every layer), the same prompt/completion data, max length, batch size,
learning rate (constant), fp32, completion-only loss, no packing and grad clipping at 1.0
(mlx_lm.lora has no clipping), each in its own process with the same thread count:

- torch: ``localforge finetune --backend torch`` (the CLI), TRL ``SFTTrainer`` with gradient
  checkpointing off like the others (``trl``) and at TRL's default, on (``trl-gc``), and a
  hand-written peft loop (tokenize like TRL's prompt+completion, pad, forward, backward, AdamW);
- mlx (fewer steps, shorter rows: mlx runs on the CPU here): ``localforge finetune --backend
  mlx`` and ``python -m mlx_lm lora`` (its own main() and arguments, plus a timing callback).

Every row is longer than the max length, so every row is cut to exactly that length and no
batch holds padding: tokens/s compares the engines, not their padding policies.

Tokens/s counts non-padding input tokens. Step 1 is warm-up for everyone; each later step's
rate is its tokens over the loop's wall time since the previous step ended (``loop``: seen from
metrics.jsonl lines appearing, TRL's on_step_end, mlx_lm's report callback less its validation
time, the peft loop's own clock) or over the contender's own step timer (``step``). The table
gives the median step over all rounds (robust to the other processes on the cores); rounds run
the contenders in alternating order. Peak RSS is each child's own ``ru_maxrss`` (``os.wait4``).
One thread each by default: on a shared 2-core VM two threads collapse whenever another
process takes a core.

Training FLOPs per token, LoRA on a frozen base (no weight gradients for the base):

    4 * N                      forward 2N + backward through the activations 2N (N: all weights)
  + 12 * layers * c * d        attention scores and values, causal, c = (L + 1) / 2 average context
  + 6 * sum r * (in + out)     LoRA A and B: forward, input gradients and weight gradients
                               (over the LoRA targets of every layer: q_proj, v_proj, or all seven)

Utilisation is that training FLOP/s over the peak of a large fp32 matmul measured in the same
run (torch for torch contenders, mlx for mlx ones), on the same thread count.

    python benchmarks/finetune.py [--steps 6] [--rounds 2] [--seq 256] [--batch 2] [--threads 1]
                                  [--mlx-steps 4] [--mlx-seq 64] [--mlx-batch 1] [--quick]

Shapes (``--shape``, see ``benchmarks/shapes.py``): instead of the bundled model, a model of a
known shape initialised at random on the machine that runs the benchmark and saved once as a
HF folder in the work folder (fp32 on the CPU, bf16 safetensors on CUDA), so no weights
travel: ``smollm2-135m`` (SmolLM2-135M's config), ``llama-1b`` (hidden 2048, 16 layers, 32/8
heads, intermediate 8192, SmolLM2's 49152 vocabulary, tied: 1.07B parameters) or a folder
with a config.json. Its tokenizer: ``--tokenizer PATH``; else the folder's own; else the
bundled SmolLM2's when it is installed; else a byte-level BPE with a ChatML template trained
in the run on the benchmark's text, its vocabulary padded to the shape's.
``--tokenizer bpe`` (or ``none``, or ``LOCALFORGE_BENCH_TOKENIZER=bpe`` in the environment)
asks for that BPE even where the bundled model is there, as on a GPU machine.

CUDA (``--device cuda``): every contender trains in bf16 (TRL ``bf16=True``, the peft loop
under bf16 autocast, localforge ``dtype: bf16``) on one GPU, by default batch 32 x 512 tokens,
30 steps, one round, LoRA r8/alpha16 on q_proj,v_proj (``--targets all``: q,k,v,o,gate,up,
down_proj); ``--packing`` turns packing on for localforge and TRL (otherwise it is off for
everyone, Unsloth's padding-free auto mode included). The contenders: localforge-torch, trl,
trl-gc, trl-liger (``use_liger_kernel=True``; skipped with the reason when liger_kernel does
not import), peft-loop, unsloth and unsloth-gc (``FastLanguageModel`` on the same folder,
``get_peft_model`` with the same r/alpha/targets, ``use_gradient_checkpointing=False`` and its
default ``"unsloth"``, trained by its patched TRL ``SFTTrainer``; skipped with the reason when
unsloth does not import). localforge's options run when named: localforge-torch-liger
(``kernels: liger``, CUDA, with liger-kernel) and localforge-torch-compile (``compile: true``,
also on a CPU), each reported against localforge-torch. mlx contenders do not run on CUDA. Per contender: tokens/s over the
whole timed loop (steps 2..N: a GPU step takes tens of ms, so the whole loop, not the median
step, is the figure; the per-step rates are in the JSON), MFU (the formula's FLOPs: the
recompute of checkpointing is not counted) against the best bf16 8192x8192 ``torch.mm``
measured in the same run on the same card, ``max_memory_allocated`` /
``max_memory_reserved`` of the child (localforge's from its manifest's ``metrics.memory``),
the GPU memory NVML reports for the child's processes (pynvml, else ``nvidia-smi
--query-compute-apps``; the device's used memory above the baseline where the driver does not
show the child's pids, as in a container) and the loss of every step. Goals: localforge MFU
>= 0.50, >= 1.2x unsloth, >= 1.6x trl-liger.

On a GPU machine without network: it needs torch with CUDA, this checkout and wheels of what
the contenders import, downloaded elsewhere for its Python and platform, e.g.

    pip download -d wheels --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 PACKAGES
    # PACKAGES: transformers peft trl datasets accelerate pydantic jsonschema platformdirs rich pyyaml
    #           safetensors tokenizers nvidia-ml-py setuptools (localforge's build backend),
    #           and liger-kernel, unsloth, unsloth_zoo where wanted
    # there:
    pip install --no-index --find-links wheels --no-build-isolation -e . PACKAGES
    python benchmarks/finetune.py --device cuda --shape smollm2-135m --tokenizer bpe [--targets all] [--packing]
    python benchmarks/finetune.py --device cuda --shape llama-1b --tokenizer bpe --contenders localforge-torch,trl-liger,unsloth
    python benchmarks/finetune.py --device cuda --shape smollm2-135m --quick      # a smoke run

Without ``--shape`` on CUDA the bundled model is used when it is installed, else the
``smollm2-135m`` shape.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.util import find_spec
from itertools import pairwise
from pathlib import Path

TORCH = ("localforge-torch", "trl", "trl-gc", "peft-loop")
MLX = ("localforge-mlx", "mlx_lm.lora")
CUDA = ("localforge-torch", "trl", "trl-gc", "trl-liger", "peft-loop", "unsloth", "unsloth-gc")
# localforge's options, asked for by name (not in the defaults): contender -> (backend, config keys)
VARIANTS = {"localforge-torch-liger": ("torch", {"kernels": "liger"}),
            "localforge-torch-compile": ("torch", {"compile": True})}
CUDA_ONLY = ("trl-liger", "unsloth", "unsloth-gc", "localforge-torch-liger")
NEEDS = {"trl-liger": ("liger_kernel", "liger-kernel"), "unsloth": ("unsloth", "unsloth"),
         "unsloth-gc": ("unsloth", "unsloth"),
         "localforge-torch-liger": ("liger_kernel", "liger-kernel")}  # contender: (module, pip name)
ANCHOR = {"localforge-torch": "trl", "localforge-mlx": "mlx_lm.lora"}
LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
TARGETS = {"qv": ["q_proj", "v_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
LR = 1e-4
SEED = 0
DEFAULTS = {  # per device: steps, rounds, seq, batch; and what --quick sets
    "cpu": {"steps": 6, "rounds": 2, "seq": 256, "batch": 2},
    "cuda": {"steps": 30, "rounds": 1, "seq": 512, "batch": 32},
}
QUICK = {"cpu": {"steps": 3, "rounds": 1, "seq": 64, "batch": 1}, "cuda": {"steps": 6, "rounds": 1, "seq": 128, "batch": 4}}
GOALS_CUDA = {"mfu": 0.50, "vs_unsloth": 1.2, "vs_trl_liger": 1.6}

WORDS = ("the river valley holds a quiet town where bakers rise early and the old mill turns slowly "
         "beside stone bridges while merchants count copper coins and children chase kites across green "
         "fields under a pale sky that promises rain before the evening market closes its painted stalls "
         "near the harbour lighthouse whose keeper writes long letters about tides storms ships and the "
         "patient work of mending nets by lamplight in winter").split()
TOPICS = ("a mountain village", "the harbour", "a winter market", "an old lighthouse", "the river mill",
          "a library", "a train station", "the orchard", "a glass workshop", "the observatory")


# --- data ----------------------------------------------------------------------------------------


def _prose(rng: random.Random, words: int) -> str:
    out, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(8, 16):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def make_rows(n: int, seq: int, seed: int = SEED) -> list[dict]:
    """Prompt/completion rows whose prompt takes up to a quarter of ``seq`` tokens and whose whole
    is longer than ``seq`` under every tokenization used here (checked by ``check_rows``)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt_words = max(2, int(seq * rng.uniform(0.1, 0.25)) - 10)  # mlx_lm adds a ~40-token chat frame
        prompt = f"Write notes about {TOPICS[i % len(TOPICS)]}. Context: {_prose(rng, prompt_words)}"
        rows.append({"prompt": prompt, "completion": " " + _prose(rng, seq + 16)})
    return rows


def check_rows(model_path: str, rows: list[dict], seq: int) -> None:
    """Every row must exceed ``seq`` tokens however it is encoded, with completion left to learn."""
    from transformers import AutoTokenizer

    from localforge.backends.hf import quiet_transformers

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(model_path)
    for r in rows:
        plain = len(tok(r["prompt"] + r["completion"])["input_ids"])  # TRL, the peft loop
        sep = len(tok.encode(r["prompt"])) + len(tok.encode(r["completion"], add_special_tokens=False))  # localforge
        msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
        chat = len(tok.apply_chat_template(msgs, return_dict=False))  # mlx_lm.lora's CompletionsDataset
        prompt = len(tok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_dict=False))
        if min(plain, sep, chat) <= seq + 1 or prompt >= seq - 8:
            raise SystemExit(f"benchmark data: a row does not fill seq={seq} ({plain}, {sep}, {chat} tokens)")


def write_data(folder: Path, model_path: str, seq: int, rows: int = 64) -> Path:
    """``folder/train.jsonl`` and a small ``valid.jsonl`` (mlx_lm.lora requires one)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = make_rows(rows, seq)
    check_rows(model_path, train, seq)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(4, seq, seed=SEED + 1)))
    return folder


def bench_texts(n: int = 40) -> list[str]:
    """Text like the benchmark's rows, for the byte-level BPE a shape falls back to."""
    rows = make_rows(n, 64, seed=SEED + 7)
    return [r["prompt"] + r["completion"] for r in rows] + [" ".join(WORDS), *TOPICS]


# --- children ------------------------------------------------------------------------------------
# Each contender runs in its own process: ``finetune.py --child NAME SPEC RESULT``. A child
# writes {"steps": [{"tokens", "step_s", "end", "loss"}]} where ``end`` is a perf_counter
# timestamp taken in the loop when the step is done (on CUDA after a synchronize), or
# {"skip": why} when what it needs does not import.


class Skip(Exception):
    """A contender that cannot run here (a package that does not import): reported, not failed."""


def _torch_setup(spec: dict):
    import torch

    from localforge.backends.hf import quiet_transformers

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    quiet_transformers()
    return torch


def _cuda(spec: dict) -> bool:
    return spec.get("device", "cpu") == "cuda"


def _dtype(torch, spec: dict):
    return torch.bfloat16 if spec.get("dtype") == "bf16" else torch.float32


def _lora(spec: dict) -> dict:
    return spec.get("lora", LORA)


def _cuda_memory(torch, spec: dict) -> dict:
    """This process's peak allocated and reserved CUDA memory ({} on the CPU)."""
    if not _cuda(spec):
        return {}
    torch.cuda.synchronize()
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def _read_rows(spec: dict) -> list[dict]:
    return [json.loads(line) for line in Path(spec["data"], "train.jsonl").read_text().splitlines() if line]


def step_timer(steps: list[dict], sync=None, tokens_per_step: int | None = None):
    """A transformers Trainer callback appending each step's input tokens, duration, end time
    and logged loss to ``steps``. ``sync`` (torch.cuda.synchronize) runs before a step's clock
    is read, so the time is the GPU's; ``tokens_per_step`` stands in for a trainer that does
    not count its input tokens (every row fills the max length: batch x seq)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        begin, seen = 0.0, 0

        def on_step_begin(self, args, state, control, **kw):
            if sync is not None:
                sync()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if sync is not None:
                sync()
            end = time.perf_counter()
            seen = getattr(state, "num_input_tokens_seen", 0) or 0
            row = {"tokens": seen - self.seen, "step_s": end - self.begin, "end": end}
            if row["tokens"] <= 0 and tokens_per_step:
                row.update(tokens=tokens_per_step, tokens_estimated=True)
            steps.append(row)
            self.seen = seen

        def on_log(self, args, state, control, logs=None, **kw):
            if steps and logs and "loss" in logs and "loss" not in steps[-1]:
                steps[-1]["loss"] = float(logs["loss"])

    return Timer()


def _sft_config(spec: dict, **extra):
    """TRL's SFTConfig as every TRL-trained contender shares it (``extra``: a contender's own keys)."""
    from trl import SFTConfig

    cuda = _cuda(spec)
    kw = dict(
        output_dir=str(Path(spec["work"], "trl")), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_length=spec["seq"], max_steps=spec["steps"], learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=spec.get("dtype") == "bf16", fp16=False, gradient_checkpointing=spec.get("checkpointing", False),
        completion_only_loss=True, packing=spec.get("packing", False), save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=not cuda, seed=SEED, dataloader_num_workers=0, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding")
    if cuda:
        kw.update(logging_steps=1)  # the loss of every step (its .item() is one sync a step, like the others')
    kw.update(extra)
    return SFTConfig(**kw)


def child_trl(spec: dict) -> dict:
    torch = _torch_setup(spec)
    liger = spec.get("liger", False)
    if liger:
        try:
            import liger_kernel  # noqa: F401
        except Exception as exc:  # ImportError, or triton failing on this machine
            raise Skip(f"liger_kernel does not import: {type(exc).__name__}: {exc}") from None
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    steps: list[dict] = []
    lora = _lora(spec)
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=_dtype(torch, spec))
    config = _sft_config(spec, **({"use_liger_kernel": True} if liger else {}))
    peft = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["targets"], task_type="CAUSAL_LM")
    sync = torch.cuda.synchronize if _cuda(spec) else None
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(_read_rows(spec)),
                         processing_class=tok, peft_config=peft, callbacks=[step_timer(steps, sync)])
    trainer.train()
    return {"steps": steps, "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            **_cuda_memory(torch, spec)}


def child_unsloth(spec: dict) -> dict:
    """Unsloth as its README trains: FastLanguageModel on the same folder, its get_peft_model with
    the same LoRA, and TRL's SFTTrainer as Unsloth patches it, with the same SFTConfig as ``trl``.
    Checkpointing: off (``unsloth``) or Unsloth's own ``"unsloth"`` (``unsloth-gc``)."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    try:
        import unsloth  # noqa: F401  (first: it patches transformers, peft and trl as they import)
        from unsloth import FastLanguageModel
    except Exception as exc:  # ImportError, or its own "no GPU" / version errors at import
        raise Skip(f"unsloth does not import: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    torch = _torch_setup(spec)
    from datasets import Dataset
    from trl import SFTTrainer

    steps: list[dict] = []
    lora = _lora(spec)
    gc = "unsloth" if spec.get("checkpointing") else False
    load = {"model_name": spec["model_path"], "max_seq_length": spec["seq"], "dtype": _dtype(torch, spec),
            "load_in_4bit": False, "load_in_8bit": False, "full_finetuning": False, "fix_tokenizer": False,
            "use_gradient_checkpointing": gc, "random_state": SEED}
    if "load_in_16bit" in inspect.signature(FastLanguageModel.from_pretrained).parameters:
        load["load_in_16bit"] = True  # 16-bit LoRA, as the others (newer Unsloth; older ones load dtype as is)
    model, tok = FastLanguageModel.from_pretrained(**load)
    model = FastLanguageModel.get_peft_model(
        model, r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["targets"], bias="none", use_gradient_checkpointing=gc, random_state=SEED)
    # no padding-free batching unless packing is asked (Unsloth turns it on when unset): like everyone else
    extra = {} if spec.get("packing") else {"padding_free": False}
    config = _sft_config(spec, gradient_checkpointing=bool(gc), **extra)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(_read_rows(spec)),
                         processing_class=tok,
                         callbacks=[step_timer(steps, torch.cuda.synchronize, spec["batch"] * spec["seq"])])
    trainer.train()
    return {"steps": steps, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **_cuda_memory(torch, spec)}


def _tokenize_like_trl(tok, row: dict, seq: int) -> tuple[list[int], list[int]]:
    """TRL's non-chat prompt/completion encoding: prompt+completion+EOS as one string, the
    completion starting where it and the prompt alone diverge; cut to ``seq``."""
    prompt = tok(row["prompt"])["input_ids"]
    ids = tok(row["prompt"] + row["completion"] + tok.eos_token)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt, ids, strict=False)) if a != b), min(len(prompt), len(ids)))
    labels = [-100] * start + ids[start:]
    return ids[:seq], labels[:seq]


def child_peft(spec: dict) -> dict:
    torch = _torch_setup(spec)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = _cuda(spec)
    device = "cuda" if cuda else "cpu"
    lora = _lora(spec)
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=_dtype(torch, spec))
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["targets"], task_type="CAUSAL_LM")).train()
    if cuda:
        model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    data = [_tokenize_like_trl(tok, r, spec["seq"]) for r in _read_rows(spec)]
    order = random.Random(SEED).sample(range(len(data)), len(data))
    # on CUDA, bf16 autocast as TRL's bf16=True does (the peft adapters stay fp32)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and spec.get("dtype") == "bf16" \
        else contextlib.nullcontext
    steps = []
    for step in range(spec["steps"]):
        t0 = time.perf_counter()
        rows = [data[order[(step * spec["batch"] + k) % len(data)]] for k in range(spec["batch"])]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (x, y) in enumerate(rows):
            ids[b, :len(x)], labels[b, :len(y)], mask[b, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        tokens = int(mask.sum())
        if cuda:
            ids, labels, mask = (t.to(device, non_blocking=True) for t in (ids, labels, mask))
        with autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the step (the GPU's too)
        end = time.perf_counter()
        steps.append({"tokens": tokens, "step_s": end - t0, "end": end, "loss": value})
    return {"steps": steps, "trainable_params": sum(p.numel() for p in params), **_cuda_memory(torch, spec)}


def _mlx_block(target: str) -> str:
    """The block part of an mlx_lm LoRA key: self_attn.q_proj, mlp.gate_proj."""
    return "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"


def child_mlx_lm(spec: dict) -> dict:
    """``python -m mlx_lm lora ...``: its own main() and arguments, with a per-step timing callback."""
    import mlx_lm.lora as lora
    import yaml
    from mlx_lm.tuner.callbacks import TrainingCallback

    steps: list[dict] = []
    adapter = _lora(spec)
    per_step_tokens = spec["batch"] * (spec["seq"] - 1)  # rows are cut to seq; mlx_lm feeds all but the last

    class Timer(TrainingCallback):
        val_s = 0.0  # mlx_lm validates before the last step: that time is not training

        def on_val_loss_report(self, info: dict):
            self.val_s += info["val_time"]

        def on_train_loss_report(self, info: dict):
            steps.append({"tokens": per_step_tokens, "step_s": 1.0 / info["iterations_per_second"],
                          "end": time.perf_counter(), "excluded_s": self.val_s})
            self.val_s = 0.0

    original = lora.train

    def train(*a, **kw):
        kw["training_callback"] = Timer()
        return original(*a, **kw)

    lora.train = train
    work = Path(spec["work"])
    cfg = work / "mlx_lm.yaml"
    cfg.write_text(yaml.safe_dump({
        "lora_parameters": {"rank": adapter["rank"], "scale": adapter["alpha"] / adapter["rank"], "dropout": adapter["dropout"],
                            "keys": [f"{_mlx_block(t)}.{t}" for t in adapter["targets"]]},
        "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.0}}}))
    sys.argv = ["mlx_lm.lora", "--train", "--model", spec["model_path"], "--data", spec["data"],
                "--iters", str(spec["steps"]), "--batch-size", str(spec["batch"]),
                "--max-seq-length", str(spec["seq"]), "--num-layers", "-1", "--mask-prompt",
                "--learning-rate", str(LR), "--steps-per-report", "1", "--steps-per-eval", "1000000",
                "--val-batches", "1", "--save-every", "1000000", "--adapter-path", str(work / "mlx_lm-adapter"),
                "--seed", str(SEED), "-c", str(cfg)]
    lora.main()
    return {"steps": steps}


def child_peak(spec: dict) -> dict:
    """Best fp32 matmul rate: torch (n=2048, same threads) and, when asked, mlx (n=1024); on
    CUDA, the best bf16 ``torch.mm`` of two 8192x8192 matrices on the card (and what the card is)."""
    import torch

    torch.set_num_threads(spec["threads"])
    out = {}
    if _cuda(spec):
        return _cuda_peak(torch, spec.get("cuda_n", 8192))

    def best(fn, n: int, reps: int) -> float:
        fn()
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            rates.append(2 * n**3 / (time.perf_counter() - t0))
        return max(rates)

    n = spec.get("torch_n", 2048)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out["torch_flops"] = best(lambda: a @ b, n, 6)
    if spec.get("mlx"):
        import mlx.core as mx

        m = spec.get("mlx_n", 1024)
        x, y = mx.random.normal((m, m)), mx.random.normal((m, m))
        mx.eval(x, y)
        out["mlx_flops"] = best(lambda: mx.eval(x @ y), m, 3)
    return out


def _cuda_peak(torch, n: int, reps: int = 10, inner: int = 5) -> dict:
    if not torch.cuda.is_available():
        return {"error": f"--device cuda: torch {torch.__version__} sees no CUDA device "
                         f"(torch.version.cuda={torch.version.cuda})"}
    props = torch.cuda.get_device_properties(0)
    gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}", "total_memory_bytes": props.total_memory,
           "multiprocessors": props.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
           "bf16_supported": torch.cuda.is_bf16_supported()}
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel, the clocks rise
        torch.mm(a, b, out=c)
    rates = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        torch.cuda.synchronize()
        rates.append(inner * 2 * n**3 / (time.perf_counter() - t0))
    return {"cuda_bf16_flops": max(rates), "cuda_bf16_rates": [round(r / 1e12, 1) for r in rates], "matmul_n": n,
            "gpu": gpu}


def child_shape(spec: dict) -> dict:
    """The random-initialised folder of ``--shape`` (benchmarks/shapes.py), built on this machine."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import shapes

    folder = shapes.build(spec["shape"], spec["out"], device=spec["device"], dtype=spec["dtype"],
                          tokenizer=spec.get("tokenizer"), texts=spec.get("texts", ()), seed=SEED)
    return {"model_path": folder, **shapes.describe(folder)}


CHILDREN = {"trl": child_trl, "trl-gc": lambda spec: child_trl({**spec, "checkpointing": True}),
            "trl-liger": lambda spec: child_trl({**spec, "liger": True}), "peft-loop": child_peft,
            "unsloth": child_unsloth, "unsloth-gc": lambda spec: child_unsloth({**spec, "checkpointing": True}),
            "mlx_lm.lora": child_mlx_lm, "peak": child_peak, "shape": child_shape}


def child_main(name: str, spec_path: str, result_path: str) -> None:
    try:
        result = CHILDREN[name](json.loads(Path(spec_path).read_text()))
    except Skip as exc:
        result = {"skip": str(exc)}
    Path(result_path).write_text(json.dumps(result))


# --- the parent -------------------------------------------------------------------------------------


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(LOCALFORGE_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    return env


def _process_tree(root: int) -> set[int]:
    """``root`` and every process below it (Linux /proc; elsewhere ``root`` alone)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return {root}
    for entry in entries:
        try:
            stat = Path(entry.path, "stat").read_text()
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children.get(pid, [])
    return tree


class GpuMemory:
    """The GPU memory the driver reports, sampled in a thread while a child runs: the child's
    processes' own (pynvml, else ``nvidia-smi --query-compute-apps=pid,used_memory``) and the
    devices' used memory above what it was before the child started (the figure to read where
    the driver shows other pids than ours, as in a container)."""

    def __init__(self, every: float = 0.1):
        self.every, self.source, self._nv, self._handles = every, None, None, []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nv, self.source = pynvml, "pynvml"
        except Exception:  # not installed, or no driver
            import shutil

            if shutil.which("nvidia-smi"):
                self.source, self.every = "nvidia-smi", max(every, 0.5)

    def sample(self) -> tuple[dict[int, int], int] | None:
        """(used bytes per pid, used bytes of all devices), or None when the driver does not answer."""
        try:
            if self._nv is not None:
                per_pid: dict[int, int] = {}
                device = 0
                for h in self._handles:
                    device += self._nv.nvmlDeviceGetMemoryInfo(h).used
                    for p in self._nv.nvmlDeviceGetComputeRunningProcesses(h):
                        if p.usedGpuMemory:  # None where the driver cannot say (some containers)
                            per_pid[p.pid] = per_pid.get(p.pid, 0) + int(p.usedGpuMemory)
                return per_pid, device
            if self.source == "nvidia-smi":
                def query(*args: str) -> str:
                    return subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                                          text=True, timeout=10).stdout

                per_pid = {}
                for line in query("--query-compute-apps=pid,used_memory").splitlines():
                    parts = [x.strip() for x in line.split(",")]
                    if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                        per_pid[int(parts[0])] = per_pid.get(int(parts[0]), 0) + int(parts[1]) * 2**20
                device = sum(int(x) for x in query("--query-gpu=memory.used").split() if x.isdigit()) * 2**20
                return per_pid, device
        except Exception:
            return None
        return None

    def watch(self) -> GpuWatch:
        """Take the baseline now (before the child starts); ``attach(pid)`` then ``stop()``."""
        return GpuWatch(self)


class GpuWatch:
    def __init__(self, gpu: GpuMemory):
        self.gpu, self.pid = gpu, None
        first = gpu.sample()
        self.baseline = first[1] if first else None
        self.process: int | None = None
        self.device: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, pid: int) -> None:
        self.pid = pid
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            got = self.gpu.sample()
            if got:
                per_pid, device = got
                tree = _process_tree(self.pid)
                if any(p in tree for p in per_pid):
                    self.process = max(self.process or 0, sum(v for p, v in per_pid.items() if p in tree))
                if self.baseline is not None:
                    self.device = max(self.device or 0, device - self.baseline)
            if self._stop.wait(self.gpu.every):
                return

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return {"nvml_source": self.gpu.source, "nvml_process_used_bytes": self.process,
                "nvml_device_used_bytes": self.device,
                "nvml_used_bytes": self.process if self.process is not None else self.device}


def run_process(cmd: list[str], env: dict, log: Path, watch: Path | None = None, poll: float = 0.02,
                gpu: GpuMemory | None = None) -> dict:
    """Run ``cmd`` to its end; its own peak RSS (``os.wait4``), exit code, wall time, and the
    perf_counter time at which each complete line appeared in ``watch`` (polled every ``poll``
    s: 20 ms on the CPU, 2 ms on CUDA, whose steps take tens of ms); with ``gpu``, the GPU
    memory the driver reports for it (``GpuMemory``)."""
    t0 = time.perf_counter()
    gw = gpu.watch() if gpu is not None and gpu.source else None
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if gw is not None:
        gw.attach(proc.pid)
    arrivals: list[float] = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if watch is not None and watch.exists():
            lines = watch.read_bytes().count(b"\n")
            now = time.perf_counter()
            arrivals += [now] * (lines - len(arrivals))
        if pid:
            break
        time.sleep(poll)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"rc": proc.returncode, "peak_rss_bytes": rss, "wall_s": time.perf_counter() - t0, "arrivals": arrivals}
    if gw is not None:
        out.update(gw.stop())
    return out


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def localforge_config(path: Path, data: Path, out: Path, s: dict, backend: str, **extra) -> Path:
    """The localforge config of a contender; ``extra`` overrides keys (``gradient_checkpointing="auto"``).
    Batch size, grad_accum 1, dtype and packing are always written, so a default that changes
    (packing: auto, an effective batch) does not change what is compared."""
    import yaml

    lora = s.get("lora", LORA)
    cfg = {"model": s.get("model_ref", "smollm2-135m"), "data": str(data / "train.jsonl"), "backend": backend,
           "method": "lora", "lora": {k: lora[k] for k in ("rank", "alpha", "dropout", "targets")}, "steps": s["steps"],
           "batch_size": s["batch"], "grad_accum": 1, "learning_rate": LR, "lr_schedule": "constant",
           "max_seq_length": s["seq"], "dtype": s.get("dtype", "fp32"), "gradient_checkpointing": False,
           "mask_prompt": True, "packing": bool(s.get("packing", False)), "seed": SEED, "eval_every": 1_000_000,
           "save_every": 1_000_000, "max_grad_norm": 1.0, "output_dir": str(out), **extra}
    if s.get("device") == "cuda":
        cfg["num_processes"] = 1  # one GPU, like every other contender
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_localforge(backend: str, s: dict, work: Path, tag: str, gpu: GpuMemory | None = None, **keys) -> dict:
    """``localforge finetune`` on the contender's config (``keys`` over it: ``kernels``, ``compile``)."""
    out = work / f"run-{tag}"
    cuda = s.get("device") == "cuda"
    cfg = localforge_config(work / f"{tag}.yaml", Path(s["data"]), out, s, backend, **keys)
    cmd = [sys.executable, "-m", "localforge", "finetune", str(cfg), "--backend", backend, "--no-progress"]
    proc = run_process(cmd, child_env(s["threads"]), work / f"{tag}.log", watch=out / "metrics.jsonl",
                       poll=0.002 if cuda else 0.02, gpu=gpu)
    if proc["rc"] != 0:
        raise RuntimeError(f"localforge {backend} failed (exit {proc['rc']}):\n{_tail(work / f'{tag}.log')}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = []
    for line, arrived in zip(lines, proc["arrivals"], strict=True):
        row = json.loads(line)
        if "loss" in row:
            steps.append({"tokens": row["tokens"], "step_s": row["seconds"], "end": arrived, "loss": row["loss"]})
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = manifest.get("metrics", {})
    res = {"steps": steps, "peak_rss_bytes": proc["peak_rss_bytes"], "wall_s": proc["wall_s"],
           "manifest_peak_rss_bytes": metrics.get("peak_rss_bytes"),
           "trainable_params": metrics.get("trainable_params")}
    if cuda:
        memory = metrics.get("memory") or {}  # peak_allocated_bytes, peak_reserved_bytes, nvml_used_bytes, predicted_peak_bytes
        res.update(peak_allocated_bytes=memory.get("peak_allocated_bytes"),
                   peak_reserved_bytes=memory.get("peak_reserved_bytes"), manifest_memory=memory,
                   plan=manifest.get("plan"))
    res.update({k: v for k, v in proc.items() if k.startswith("nvml_")})
    return res


def run_child(name: str, spec: dict, work: Path, tag: str, gpu: GpuMemory | None = None) -> dict:
    spec_path, result_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps({**spec, "work": str(work / tag)}))
    Path(work / tag).mkdir(exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, str(spec_path), str(result_path)]
    proc = run_process(cmd, child_env(spec["threads"]), work / f"{tag}.log", gpu=gpu)
    if proc["rc"] != 0 or not result_path.exists():
        raise RuntimeError(f"{name} failed (exit {proc['rc']}):\n{_tail(work / f'{tag}.log')}")
    result = json.loads(result_path.read_text())
    if "skip" in result:
        raise Skip(result["skip"])
    return {**result, "peak_rss_bytes": proc["peak_rss_bytes"], "wall_s": proc["wall_s"],
            **{k: v for k, v in proc.items() if k.startswith("nvml_")}}


MEMORY_KEYS = ("peak_allocated_bytes", "peak_reserved_bytes", "nvml_used_bytes", "nvml_process_used_bytes",
               "nvml_device_used_bytes", "nvml_source", "manifest_memory", "trainable_params", "plan")


def measure(name: str, s: dict, work: Path, tag: str, gpu: GpuMemory | None = None) -> dict:
    if name in VARIANTS:
        backend, keys = VARIANTS[name]
        res = run_localforge(backend, s, work, tag, gpu, **keys)
    elif name.startswith("localforge-"):
        res = run_localforge(name.removeprefix("localforge-"), s, work, tag, gpu)
    else:
        res = run_child(name, s, work, tag, gpu)
    steps = res["steps"]
    if len(steps) != s["steps"]:
        raise RuntimeError(f"{name}: {len(steps)} steps reported, expected {s['steps']} (see {work / tag}.log)")
    timed = steps[1:]  # step 1 is warm-up for everyone
    tokens = sum(x["tokens"] for x in timed)
    loop_s = steps[-1]["end"] - steps[0]["end"] - sum(x.get("excluded_s", 0.0) for x in timed)
    step_s = sum(x["step_s"] for x in timed)
    # per step: its tokens over the loop time since the previous step ended, and over its own timer
    loop_rates = [x["tokens"] / (x["end"] - prev["end"] - x.get("excluded_s", 0.0)) for prev, x in pairwise(steps)]
    step_rates = [x["tokens"] / x["step_s"] for x in timed]
    out = {"tokens_per_s": tokens / loop_s, "step_tokens_per_s": tokens / step_s, "timed_tokens": tokens,
           "timed_steps": len(timed), "loop_s": round(loop_s, 3), "step_s": round(step_s, 3),
           "first_step_s": round(steps[0]["step_s"], 3), "loop_rates": [round(x, 2) for x in loop_rates],
           "step_rates": [round(x, 2) for x in step_rates], "peak_rss_bytes": res["peak_rss_bytes"],
           "process_wall_s": round(res["wall_s"], 2), "tokens_per_step": [x["tokens"] for x in steps],
           **({"manifest_peak_rss_bytes": res["manifest_peak_rss_bytes"]} if "manifest_peak_rss_bytes" in res else {})}
    out["losses"] = [x.get("loss") for x in steps]
    if any(x.get("tokens_estimated") for x in steps):
        out["tokens_estimated"] = True  # the trainer did not count them: batch x seq (every row is full)
    out.update({k: res[k] for k in MEMORY_KEYS if k in res})
    return out


def build_shape(work: Path, shape: str, device: str, dtype: str, tokenizer: str | None, threads: int) -> dict:
    """``--shape`` built in a child process (``child_shape``) under ``work/model``; one line naming
    the flag, and no work folder left, where it cannot be (no GPU, an unknown shape)."""
    try:
        return run_child("shape", {"threads": threads, "shape": shape, "out": str(work / "model"), "device": device,
                                   "dtype": dtype, "tokenizer": tokenizer, "texts": bench_texts()}, work, "shape")
    except RuntimeError as exc:
        _abort(work, f"could not build --shape {shape} on {device}: {str(exc).splitlines()[-1]}")


def flops_per_token(model_path: str, seq: float, targets: list[str] | None = None) -> dict:
    from localforge.finetune.planner import ModelShape

    shape = ModelShape.from_hf_config(model_path)
    n = shape.params
    context = (seq + 1) / 2
    attention = 12 * shape.layers * context * shape.hidden
    lora = 6 * shape.layers * sum(LORA["rank"] * sum(shape.module_dims(t)) for t in (targets or LORA["targets"]))
    return {"params": n, "base": 4 * n, "attention": attention, "lora": lora, "total": 4 * n + attention + lora}


def _max(rs: list[dict], key: str):
    values = [x[key] for x in rs if x.get(key) is not None]
    return max(values) if values else None


def _abort(work: Path, message: str) -> None:
    """Stop before any contender ran: remove the work folder, say why."""
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(message)


def _gib(value) -> str:
    return f"{value / 2**30:.2f}" if value is not None else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (fp32, the default) or cuda (bf16, one GPU, the CUDA contenders)")
    ap.add_argument("--shape", help="smollm2-135m, llama-1b or a folder with a config.json: a model of that shape "
                                    "initialised at random here (default: the bundled SmolLM2-135M)")
    ap.add_argument("--tokenizer", default=os.environ.get("LOCALFORGE_BENCH_TOKENIZER") or None,
                    help="with --shape: a tokenizer folder, or bpe (none) for the byte-level BPE trained here "
                         "(default: $LOCALFORGE_BENCH_TOKENIZER, else the shape folder's, the bundled SmolLM2's, "
                         "the BPE)")
    ap.add_argument("--targets", choices=tuple(TARGETS), default="qv",
                    help="LoRA targets: qv (q_proj, v_proj) or all (q,k,v,o,gate,up,down_proj)")
    ap.add_argument("--packing", action="store_true", help="packing on for localforge and TRL (default: off for all)")
    ap.add_argument("--steps", type=int, default=None, help="torch steps per run (the first is warm-up; default 6, "
                                                             "30 on cuda)")
    ap.add_argument("--rounds", type=int, default=None, help="default 2, 1 on cuda")
    ap.add_argument("--seq", type=int, default=None, help="default 256, 512 on cuda")
    ap.add_argument("--batch", type=int, default=None, help="default 2, 32 on cuda")
    ap.add_argument("--mlx-steps", type=int, default=4)
    ap.add_argument("--mlx-seq", type=int, default=64)
    ap.add_argument("--mlx-batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every contender (default 1: on a shared 2-core VM, 2 threads collapse "
                         "whenever another process takes a core; on cuda up to 8)")
    ap.add_argument("--contenders", default=None,
                    help=f"comma-separated (default: {','.join(TORCH + MLX)}; on cuda {','.join(CUDA)})")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, run folders)")
    ap.add_argument("--out", default=None, help="the result JSON (default benchmarks/results/finetune.json, "
                                                "finetune-cuda.json on cuda)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = min(8, os.cpu_count() or 1) if cuda else 1
    if args.quick:
        for key, value in QUICK[args.device].items():
            setattr(args, key, value)
        args.mlx_steps, args.mlx_seq, args.mlx_batch = 3, 64, 1
    if args.contenders is None:
        args.contenders = ",".join(CUDA if cuda else TORCH + MLX)
    if args.out is None:
        args.out = "benchmarks/results/finetune-cuda.json" if cuda else "benchmarks/results/finetune.json"

    from localforge.backends import availability, ensure_hf
    from localforge.models import resolve

    threads = args.threads
    wanted = args.contenders.split(",")
    unknown = [n for n in wanted if n not in (*TORCH, *MLX, *CUDA, *VARIANTS)]
    if unknown:
        raise SystemExit(f"unknown contenders {', '.join(unknown)}: expected some of "
                         f"{', '.join(dict.fromkeys(CUDA + MLX + tuple(VARIANTS)))}")
    shape = args.shape
    model_ref = "smollm2-135m"
    model_path = None
    if shape is None:
        try:
            model_path = ensure_hf(resolve("smollm2-135m"))
        except Exception as exc:
            if not cuda:
                raise
            shape = "smollm2-135m"
            print(f"the bundled model is not here ({str(exc).splitlines()[0]}): using --shape {shape}", file=sys.stderr)
    skipped = {}
    for name in wanted:
        if cuda and name in MLX:
            skipped[name] = "mlx contenders do not run on --device cuda"
            continue
        if not cuda and name in CUDA_ONLY:
            skipped[name] = "runs on --device cuda only"
            continue
        ok, why = availability("mlx" if name in MLX else "torch")
        if not ok:
            skipped[name] = why
        elif name in NEEDS and find_spec(NEEDS[name][0]) is None:
            skipped[name] = f"{NEEDS[name][0]} is not installed (pip install {NEEDS[name][1]})"
    contenders = [c for c in wanted if c not in skipped]
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)

    tmp = tempfile.mkdtemp(prefix="lf-bench-finetune-")
    work = Path(tmp)
    gpu = GpuMemory() if cuda else None
    peaks: list[dict] = []
    if cuda:  # first: a machine without a usable GPU stops here, with the reason
        peaks.append(run_child("peak", {"threads": threads, "device": "cuda"}, work, "peak-0"))
        if "error" in peaks[0]:
            _abort(work, peaks[0]["error"])
        g = peaks[0]["gpu"]
        print(f"{g['name']} ({g['total_memory_bytes'] / 2**30:.0f} GiB, sm {g['capability']}, torch {g['torch']}, "
              f"CUDA {g['cuda']}): bf16 matmul peak {peaks[0]['cuda_bf16_flops'] / 1e12:.0f} TFLOP/s",
              file=sys.stderr, flush=True)
        if not g["bf16_supported"]:
            _abort(work, f"{g['name']} has no bf16: the CUDA mode trains in bf16")
    dtype = "bf16" if cuda else "fp32"
    shape_info: dict = {}
    if shape is not None:
        print(f"building {shape} ({dtype}, random weights, on {args.device}) ...", file=sys.stderr, flush=True)
        shape_info = build_shape(work, shape, args.device, dtype, args.tokenizer, threads)
        model_path = model_ref = shape_info["model_path"]
        print(f"  {shape_info.get('params', 0) / 1e6:.1f}M parameters, tokenizer: {shape_info.get('tokenizer_source')}",
              file=sys.stderr, flush=True)
    if args.tokenizer and shape is None:
        print(f"--tokenizer {args.tokenizer} applies with --shape: the bundled model keeps its own", file=sys.stderr)
    lora = {**LORA, "targets": TARGETS[args.targets]}
    settings = {"torch": {"steps": args.steps, "seq": args.seq, "batch": args.batch}}
    if not cuda:
        settings["mlx"] = {"steps": args.mlx_steps, "seq": args.mlx_seq, "batch": args.mlx_batch}
    for kind, s in settings.items():
        rows = max(64, s["batch"] * s["steps"]) if cuda else 64  # on cuda, no epoch ends inside the timed loop
        s.update(threads=threads, model_path=model_path,
                 data=str(write_data(work / f"data-{kind}", model_path, s["seq"], rows=rows)))
        s.update(device=args.device, dtype=dtype, lora=lora, packing=args.packing, model_ref=model_ref)

    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    failed: dict[str, str] = {}
    began = time.perf_counter()
    for r in range(args.rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]  # alternate so drift hits everyone alike
        if not (cuda and r == 0):
            peaks.append(run_child("peak", {"threads": threads, "mlx": any(c in MLX for c in contenders),
                                            "device": args.device}, work, f"peak-{r}"))
        for name in order:
            if name in skipped:
                continue
            s = settings["mlx" if name in MLX else "torch"]
            print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            try:
                res = measure(name, s, work, f"{name}-{r}", gpu)
            except Skip as exc:
                print(f"  skipped: {exc}", file=sys.stderr, flush=True)
                skipped[name] = str(exc)
                continue
            except RuntimeError as exc:
                print(f"  failed: {exc}", file=sys.stderr, flush=True)
                failed.setdefault(name, str(exc)[-2000:])
                continue
            runs[name].append(res)
            if cuda:
                loss = next((x for x in reversed(res["losses"]) if x is not None), None)
                print(f"  {res['tokens_per_s']:.0f} tok/s, allocated {_gib(res.get('peak_allocated_bytes'))} GiB, "
                      f"held {_gib(res.get('peak_reserved_bytes'))} GiB, NVML {_gib(res.get('nvml_used_bytes'))} GiB, "
                      f"last loss {f'{loss:.4f}' if loss is not None else '-'}", file=sys.stderr, flush=True)
            else:
                print(f"  {res['tokens_per_s']:.1f} tok/s, peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB",
                      file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - began

    torch_peak = max(p.get("torch_flops", 0.0) for p in peaks)
    mlx_peak = max((p.get("mlx_flops", 0.0) for p in peaks), default=0.0)
    gpu_peak = max((p.get("cuda_bf16_flops", 0.0) for p in peaks), default=0.0)
    rows = {}
    for name, rs in runs.items():
        if not rs:
            continue
        kind = "mlx" if name in MLX else "torch"
        s = settings[kind]
        seq = s["seq"] - 1 if name == "mlx_lm.lora" else s["seq"]
        fpt = flops_per_token(model_path, seq, lora["targets"])
        peak = gpu_peak if cuda else mlx_peak if kind == "mlx" else torch_peak
        if cuda:  # the whole timed loop of each round: a GPU step is too short for one step's rate
            tps = statistics.median(x["tokens_per_s"] for x in rs)
        else:  # the median step over every round: robust to the other processes that share the cores
            tps = statistics.median(x for r in rs for x in r["loop_rates"])
        flops = tps * fpt["total"]
        rows[name] = {
            "kind": kind, "tokens_per_s": round(tps, 2),
            "step_tokens_per_s": round(statistics.median(x for r in rs for x in r["step_rates"]), 2),
            "best_round_tokens_per_s": round(max(x["tokens_per_s"] for x in rs), 2),
            "tokens_per_s_rounds": [round(x["tokens_per_s"], 2) for x in rs],
            "peak_rss_bytes": max(x["peak_rss_bytes"] for x in rs),
            "train_gflops": round(flops / 1e9, 2),
            "utilisation": round(flops / peak, 4) if peak else None,
            "flops_per_token": round(fpt["total"]),
            "runs": rs,
        }
        if cuda:
            losses = rs[-1]["losses"]
            rows[name].update(
                mfu=rows[name]["utilisation"], peak_allocated_bytes=_max(rs, "peak_allocated_bytes"),
                peak_reserved_bytes=_max(rs, "peak_reserved_bytes"), nvml_used_bytes=_max(rs, "nvml_used_bytes"),
                nvml_source=rs[-1].get("nvml_source"), losses=losses,
                final_loss=next((x for x in reversed(losses) if x is not None), None))

    def ratio(a: str, b: str, key: str = "tokens_per_s") -> float | None:
        if a in rows and b in rows and rows[a].get(key) is not None and rows[b].get(key):
            return round(rows[a][key] / rows[b][key], 3)
        return None

    if cuda:
        goals = {
            "localforge_torch_mfu": {"ratio": rows.get("localforge-torch", {}).get("mfu"),
                                     "goal": f">= {GOALS_CUDA['mfu']:.2f}"},
            "localforge_torch_vs_unsloth": {"ratio": ratio("localforge-torch", "unsloth"),
                                            "goal": f">= {GOALS_CUDA['vs_unsloth']}"},
            "localforge_torch_vs_trl_liger": {"ratio": ratio("localforge-torch", "trl-liger"),
                                              "goal": f">= {GOALS_CUDA['vs_trl_liger']}"},
            "localforge_torch_vs_trl": {"ratio": ratio("localforge-torch", "trl"), "goal": ">= 1.6 (reference)"},
            "localforge_torch_vs_peft_loop": {"ratio": ratio("localforge-torch", "peft-loop"),
                                              "goal": ">= 0.95 (reference)"},
            "allocated_localforge_torch_vs_unsloth": {
                "ratio": ratio("localforge-torch", "unsloth", "peak_allocated_bytes"), "goal": "<= 1.0 (reference)"},
            "allocated_localforge_torch_vs_trl_liger": {
                "ratio": ratio("localforge-torch", "trl-liger", "peak_allocated_bytes"), "goal": "<= 1.0 (reference)"},
        }
    else:
        goals = {
            "localforge_torch_vs_trl": {"ratio": ratio("localforge-torch", "trl"), "goal": ">= 1.6"},
            "localforge_torch_vs_trl_gc": {"ratio": ratio("localforge-torch", "trl-gc"), "goal": ">= 1.6"},
            "localforge_torch_vs_peft_loop": {"ratio": ratio("localforge-torch", "peft-loop"), "goal": ">= 0.95"},
            "localforge_mlx_vs_mlx_lm": {"ratio": ratio("localforge-mlx", "mlx_lm.lora"), "goal": ">= 0.95"},
            "peak_rss_localforge_torch_vs_trl": {"ratio": ratio("localforge-torch", "trl", "peak_rss_bytes"),
                                                 "goal": "<= 1.0"},
            "peak_rss_localforge_torch_vs_trl_gc": {"ratio": ratio("localforge-torch", "trl-gc", "peak_rss_bytes"),
                                                    "goal": "<= 1.0 (reference)"},
            "peak_rss_localforge_torch_vs_peft_loop": {"ratio": ratio("localforge-torch", "peft-loop", "peak_rss_bytes"),
                                                       "goal": "<= 1.0 (reference)"},
            "peak_rss_localforge_mlx_vs_mlx_lm": {"ratio": ratio("localforge-mlx", "mlx_lm.lora", "peak_rss_bytes"),
                                                  "goal": "<= 1.0"},
        }
    for variant in VARIANTS:  # does an option pay? (what would make ``auto`` plan it)
        if variant in rows:
            goals[f"{variant.replace('-', '_')}_vs_localforge_torch"] = {
                "ratio": ratio(variant, "localforge-torch"), "goal": ">= 1.0 (reference)"}
    for g in goals.values():
        if g["ratio"] is not None:
            op, target = g["goal"].split()[:2]
            g["met"] = g["ratio"] >= float(target) if op == ">=" else g["ratio"] <= float(target)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    model_name = shape_info and f"{Path(shape).name if shape not in ('smollm2-135m', 'llama-1b') else shape} (random init)"
    if cuda:
        s = settings["torch"]
        g = peaks[0]["gpu"]
        table = Table(title=f"LoRA fine-tuning on {g['name']}, {model_name or 'SmolLM2-135M'} bf16: batch {s['batch']} x "
                            f"{s['seq']} tokens, {s['steps']} steps (first excluded), LoRA r{lora['rank']} on "
                            f"{args.targets} ({','.join(lora['targets'])}), packing {'on' if args.packing else 'off'}, "
                            f"median of {args.rounds} round(s)")
        for col in ("contender", "tok/s", "tok/s (step)", f"MFU (of {gpu_peak / 1e12:.0f} TFLOP/s)",
                    "allocated GiB", "held GiB", "NVML GiB", "final loss", "vs trl", "vs trl-liger", "vs unsloth"):
            table.add_column(col)
        for n, r in rows.items():
            vs = [f"{ratio(n, b):.3f}x" if b != n and ratio(n, b) else "" for b in ("trl", "trl-liger", "unsloth")]
            table.add_row(n, f"{r['tokens_per_s']:.0f}", f"{r['step_tokens_per_s']:.0f}",
                          f"{r['mfu']:.1%}" if r["mfu"] is not None else "-", _gib(r["peak_allocated_bytes"]),
                          _gib(r["peak_reserved_bytes"]), _gib(r["nvml_used_bytes"]),
                          f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-", *vs)
        console.print(table)
        if skipped:
            console.print("skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        if failed:
            console.print("failed (see the JSON's failed): " + ", ".join(failed))
    for kind in () if cuda else ("torch", "mlx"):
        s = settings[kind]
        names = [n for n in rows if rows[n]["kind"] == kind]
        if not names:
            continue
        peak = torch_peak if kind == "torch" else mlx_peak
        table = Table(title=f"LoRA fine-tuning, {model_name or 'SmolLM2-135M'} fp32, {kind}: batch {s['batch']} x "
                            f"{s['seq']} tokens, "
                            f"{s['steps']} steps (first excluded), {threads} thread(s), median step of {args.rounds} round(s)")
        for col in ("contender", "tok/s (loop)", "tok/s (step)", "rounds (whole-run tok/s)", "peak RSS GiB",
                    "train GFLOP/s",
                    f"of {peak / 1e9:.0f} GFLOP/s peak", "vs anchor"):
            table.add_column(col)
        for n in names:
            r = rows[n]
            anchor = ANCHOR.get(n)
            vs = f"{ratio(n, anchor):.3f}x {anchor}" if anchor and ratio(n, anchor) else ""
            table.add_row(n, f"{r['tokens_per_s']:.1f}", f"{r['step_tokens_per_s']:.1f}",
                          " / ".join(f"{x:.0f}" for x in r["tokens_per_s_rounds"]),
                          f"{r['peak_rss_bytes'] / 2**30:.2f}", f"{r['train_gflops']:.1f}",
                          f"{r['utilisation']:.1%}" if r["utilisation"] is not None else "-", vs)
        console.print(table)
    gt = Table(title="Goals")
    for col in ("comparison", "value" if cuda else "ratio", "goal", "met"):
        gt.add_column(col)
    for name, g in goals.items():
        if g["ratio"] is not None:
            gt.add_row(name, f"{g['ratio']:.3f}", g["goal"], "yes" if g["met"] else "NO")
    console.print(gt)
    fpt_main = flops_per_token(model_path, args.seq, lora["targets"])
    if cuda:
        console.print("FLOPs/token = 4N + 12*layers*c*d + 6*layers*sum(r*(in+out)), c = (L+1)/2 (no recompute counted); "
                      f"N = {fpt_main['params'] / 1e6:.1f}M, {fpt_main['total'] / 1e9:.2f} GFLOP/token. "
                      f"MFU against the best bf16 {peaks[0]['matmul_n']}^3 torch.mm on this card: "
                      f"{gpu_peak / 1e12:.0f} TFLOP/s. {elapsed:.0f} s in all.")
    else:
        console.print("FLOPs/token = 4N + 12*layers*c*d + 6*layers*sum(r*(in+out)), c = (L+1)/2; "
                      f"N = {fpt_main['params'] / 1e6:.1f}M. "
                      f"Peaks: torch {torch_peak / 1e9:.0f} GFLOP/s (fp32 2048^3 matmul), "
                      f"mlx {mlx_peak / 1e9:.1f} GFLOP/s (fp32 1024^3 matmul). {elapsed:.0f} s in all.")

    from localforge.backends import REGISTRY
    from localforge.finetune.report import versions

    extra_packages = ("trl", "datasets") + (("liger-kernel", "unsloth", "unsloth_zoo", "triton", "nvidia-ml-py")
                                            if cuda else ())
    result = {
        "machine": {**machine(), **({"gpu": peaks[0]["gpu"]} if cuda else {})},
        "versions": {**versions(tuple(p for s in REGISTRY.values() for p in s.packages)),
                     **{p: _version(p) for p in extra_packages}},
        "settings": {"device": args.device, "dtype": dtype, "threads": threads, "rounds": args.rounds, "lora": lora,
                     "targets": args.targets, "packing": args.packing, "learning_rate": LR,
                     "model": shape or "smollm2-135m (bundled)",
                     **{k: {x: v[x] for x in ("steps", "seq", "batch")} for k, v in settings.items()}},
        "shape": shape_info or None,
        "flops_formula": "4*N + 12*layers*((L+1)/2)*d + 6*layers*sum(r*(in+out) over LoRA targets)",
        "flops_per_token": {k: flops_per_token(model_path, settings[k]["seq"], lora["targets"]) for k in settings},
        "peak_flops": ({"cuda_bf16": gpu_peak, "rounds": peaks} if cuda
                       else {"torch": torch_peak, "mlx": mlx_peak, "rounds": peaks}),
        "contenders": rows,
        "skipped": skipped,
        "failed": failed,
        "goals": goals,
        "elapsed_s": round(elapsed, 1),
    }
    finish(result, Path(args.out), work, args.keep)


def machine() -> dict:
    import platform

    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg()}


def finish(result: dict, out: Path, work: Path, keep: bool) -> None:
    """Write the result JSON; remove the work folder unless asked to keep it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if keep:
        print(f"work folder: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:])
    else:
        main()
