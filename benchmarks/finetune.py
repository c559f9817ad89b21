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

Utilisation is that training FLOP/s over the peak of a large fp32 matmul measured in the same
run (torch for torch contenders, mlx for mlx ones), on the same thread count.

    python benchmarks/finetune.py [--steps 6] [--rounds 2] [--seq 256] [--batch 2] [--threads 1]
                                  [--mlx-steps 4] [--mlx-seq 64] [--mlx-batch 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

TORCH = ("localforge-torch", "trl", "trl-gc", "peft-loop")
MLX = ("localforge-mlx", "mlx_lm.lora")
ANCHOR = {"localforge-torch": "trl", "localforge-mlx": "mlx_lm.lora"}
LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
LR = 1e-4
SEED = 0

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


# --- children ------------------------------------------------------------------------------------
# Each contender runs in its own process: ``finetune.py --child NAME SPEC RESULT``. A child
# writes {"steps": [{"tokens", "step_s", "end"}]} where ``end`` is a perf_counter timestamp taken
# in the loop when the step is done.


def _torch_setup(spec: dict):
    import torch

    from localforge.backends.hf import quiet_transformers

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    quiet_transformers()
    return torch


def _read_rows(spec: dict) -> list[dict]:
    return [json.loads(line) for line in Path(spec["data"], "train.jsonl").read_text().splitlines() if line]


def step_timer(steps: list[dict]):
    """A transformers Trainer callback appending each step's input tokens, duration and end time to ``steps``."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        begin, seen = 0.0, 0

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            end = time.perf_counter()
            steps.append({"tokens": state.num_input_tokens_seen - self.seen, "step_s": end - self.begin, "end": end})
            self.seen = state.num_input_tokens_seen

    return Timer()


def child_trl(spec: dict) -> dict:
    torch = _torch_setup(spec)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    steps: list[dict] = []

    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(Path(spec["work"], "trl")), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_length=spec["seq"], max_steps=spec["steps"], learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=False, fp16=False, gradient_checkpointing=spec.get("checkpointing", False),
        completion_only_loss=True, packing=False, save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=True, seed=SEED, dataloader_num_workers=0, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding")
    peft = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["targets"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(_read_rows(spec)),
                         processing_class=tok, peft_config=peft, callbacks=[step_timer(steps)])
    trainer.train()
    return {"steps": steps, "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


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

    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["targets"], task_type="CAUSAL_LM")).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    data = [_tokenize_like_trl(tok, r, spec["seq"]) for r in _read_rows(spec)]
    order = random.Random(SEED).sample(range(len(data)), len(data))
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
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        end = time.perf_counter()
        steps.append({"tokens": int(mask.sum()), "step_s": end - t0, "end": end})
    return {"steps": steps, "trainable_params": sum(p.numel() for p in params)}


def child_mlx_lm(spec: dict) -> dict:
    """``python -m mlx_lm lora ...``: its own main() and arguments, with a per-step timing callback."""
    import mlx_lm.lora as lora
    import yaml
    from mlx_lm.tuner.callbacks import TrainingCallback

    steps: list[dict] = []
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
        "lora_parameters": {"rank": LORA["rank"], "scale": LORA["alpha"] / LORA["rank"], "dropout": LORA["dropout"],
                            "keys": [f"self_attn.{t}" for t in LORA["targets"]]},
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
    """Best fp32 matmul rate: torch (n=2048, same threads) and, when asked, mlx (n=1024)."""
    import torch

    torch.set_num_threads(spec["threads"])
    out = {}

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


CHILDREN = {"trl": child_trl, "trl-gc": lambda spec: child_trl({**spec, "checkpointing": True}), "peft-loop": child_peft, "mlx_lm.lora": child_mlx_lm, "peak": child_peak}


def child_main(name: str, spec_path: str, result_path: str) -> None:
    result = CHILDREN[name](json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))


# --- the parent -------------------------------------------------------------------------------------


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(LOCALFORGE_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    return env


def run_process(cmd: list[str], env: dict, log: Path, watch: Path | None = None) -> dict:
    """Run ``cmd`` to its end; its own peak RSS (``os.wait4``), exit code, wall time, and the
    perf_counter time at which each complete line appeared in ``watch`` (polled every 20 ms)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    arrivals: list[float] = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if watch is not None and watch.exists():
            lines = watch.read_bytes().count(b"\n")
            now = time.perf_counter()
            arrivals += [now] * (lines - len(arrivals))
        if pid:
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"rc": proc.returncode, "peak_rss_bytes": rss, "wall_s": time.perf_counter() - t0, "arrivals": arrivals}


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def localforge_config(path: Path, data: Path, out: Path, s: dict, backend: str, **extra) -> Path:
    """The localforge config of a contender; ``extra`` overrides keys (``gradient_checkpointing="auto"``)."""
    import yaml

    cfg = {"model": "smollm2-135m", "data": str(data / "train.jsonl"), "backend": backend, "method": "lora",
           "lora": {k: LORA[k] for k in ("rank", "alpha", "dropout", "targets")}, "steps": s["steps"],
           "batch_size": s["batch"], "grad_accum": 1, "learning_rate": LR, "lr_schedule": "constant",
           "max_seq_length": s["seq"], "dtype": "fp32", "gradient_checkpointing": False, "mask_prompt": True,
           "packing": False, "seed": SEED, "eval_every": 1_000_000, "save_every": 1_000_000,
           "max_grad_norm": 1.0, "output_dir": str(out), **extra}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_localforge(backend: str, s: dict, work: Path, tag: str) -> dict:
    out = work / f"run-{tag}"
    cfg = localforge_config(work / f"{tag}.yaml", Path(s["data"]), out, s, backend)
    cmd = [sys.executable, "-m", "localforge", "finetune", str(cfg), "--backend", backend, "--no-progress"]
    proc = run_process(cmd, child_env(s["threads"]), work / f"{tag}.log", watch=out / "metrics.jsonl")
    if proc["rc"] != 0:
        raise RuntimeError(f"localforge {backend} failed (exit {proc['rc']}):\n{_tail(work / f'{tag}.log')}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = []
    for line, arrived in zip(lines, proc["arrivals"], strict=True):
        row = json.loads(line)
        if "loss" in row:
            steps.append({"tokens": row["tokens"], "step_s": row["seconds"], "end": arrived})
    manifest = json.loads((out / "manifest.json").read_text())
    return {"steps": steps, "peak_rss_bytes": proc["peak_rss_bytes"], "wall_s": proc["wall_s"],
            "manifest_peak_rss_bytes": manifest["metrics"]["peak_rss_bytes"],
            "trainable_params": manifest["metrics"].get("trainable_params")}


def run_child(name: str, spec: dict, work: Path, tag: str) -> dict:
    spec_path, result_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps({**spec, "work": str(work / tag)}))
    Path(work / tag).mkdir(exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, str(spec_path), str(result_path)]
    proc = run_process(cmd, child_env(spec["threads"]), work / f"{tag}.log")
    if proc["rc"] != 0 or not result_path.exists():
        raise RuntimeError(f"{name} failed (exit {proc['rc']}):\n{_tail(work / f'{tag}.log')}")
    return {**json.loads(result_path.read_text()), "peak_rss_bytes": proc["peak_rss_bytes"], "wall_s": proc["wall_s"]}


def measure(name: str, s: dict, work: Path, tag: str) -> dict:
    if name.startswith("localforge-"):
        res = run_localforge(name.removeprefix("localforge-"), s, work, tag)
    else:
        res = run_child(name, s, work, tag)
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
    return {"tokens_per_s": tokens / loop_s, "step_tokens_per_s": tokens / step_s, "timed_tokens": tokens,
            "timed_steps": len(timed), "loop_s": round(loop_s, 3), "step_s": round(step_s, 3),
            "first_step_s": round(steps[0]["step_s"], 3), "loop_rates": [round(x, 2) for x in loop_rates],
            "step_rates": [round(x, 2) for x in step_rates], "peak_rss_bytes": res["peak_rss_bytes"],
            "process_wall_s": round(res["wall_s"], 2), "tokens_per_step": [x["tokens"] for x in steps],
            **({"manifest_peak_rss_bytes": res["manifest_peak_rss_bytes"]} if "manifest_peak_rss_bytes" in res else {})}


def flops_per_token(model_path: str, seq: float) -> dict:
    from localforge.finetune.planner import ModelShape

    shape = ModelShape.from_hf_config(model_path)
    n = shape.params
    context = (seq + 1) / 2
    attention = 12 * shape.layers * context * shape.hidden
    lora = 6 * shape.layers * sum(LORA["rank"] * sum(shape.module_dims(t)) for t in LORA["targets"])
    return {"params": n, "base": 4 * n, "attention": attention, "lora": lora, "total": 4 * n + attention + lora}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="torch steps per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--mlx-steps", type=int, default=4)
    ap.add_argument("--mlx-seq", type=int, default=64)
    ap.add_argument("--mlx-batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for every contender (default 1: on a shared 2-core VM, 2 threads collapse "
                         "whenever another process takes a core)")
    ap.add_argument("--contenders", default=",".join(TORCH + MLX))
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, run folders)")
    ap.add_argument("--out", default="benchmarks/results/finetune.json")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds, args.seq, args.batch = 3, 1, 64, 1
        args.mlx_steps, args.mlx_seq, args.mlx_batch = 3, 64, 1

    from localforge.backends import availability, ensure_hf
    from localforge.models import resolve

    threads = args.threads
    model_path = ensure_hf(resolve("smollm2-135m"))
    wanted = args.contenders.split(",")
    skipped = {}
    for name in wanted:
        ok, why = availability("mlx" if name in MLX else "torch")
        if not ok:
            skipped[name] = why
    contenders = [c for c in wanted if c not in skipped]
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)

    tmp = tempfile.mkdtemp(prefix="lf-bench-finetune-")
    work = Path(tmp)
    settings = {
        "torch": {"steps": args.steps, "seq": args.seq, "batch": args.batch},
        "mlx": {"steps": args.mlx_steps, "seq": args.mlx_seq, "batch": args.mlx_batch},
    }
    for kind, s in settings.items():
        s.update(threads=threads, model_path=model_path,
                 data=str(write_data(work / f"data-{kind}", model_path, s["seq"])))

    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    peaks: list[dict] = []
    failed: dict[str, str] = {}
    began = time.perf_counter()
    for r in range(args.rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]  # alternate so drift hits everyone alike
        peaks.append(run_child("peak", {"threads": threads, "mlx": any(c in MLX for c in contenders)},
                               work, f"peak-{r}"))
        for name in order:
            s = settings["mlx" if name in MLX else "torch"]
            print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            try:
                res = measure(name, s, work, f"{name}-{r}")
            except RuntimeError as exc:
                print(f"  failed: {exc}", file=sys.stderr, flush=True)
                failed.setdefault(name, str(exc)[-2000:])
                continue
            runs[name].append(res)
            print(f"  {res['tokens_per_s']:.1f} tok/s, peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB",
                  file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - began

    torch_peak = max(p["torch_flops"] for p in peaks)
    mlx_peak = max((p.get("mlx_flops", 0.0) for p in peaks), default=0.0)
    rows = {}
    for name, rs in runs.items():
        if not rs:
            continue
        kind = "mlx" if name in MLX else "torch"
        s = settings[kind]
        seq = s["seq"] - 1 if name == "mlx_lm.lora" else s["seq"]
        fpt = flops_per_token(model_path, seq)
        peak = mlx_peak if kind == "mlx" else torch_peak
        # the median step over every round: robust to the other processes that share the cores
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

    def ratio(a: str, b: str, key: str = "tokens_per_s") -> float | None:
        if a in rows and b in rows and rows[b][key]:
            return round(rows[a][key] / rows[b][key], 3)
        return None

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
    for g in goals.values():
        if g["ratio"] is not None:
            op, target = g["goal"].split()[:2]
            g["met"] = g["ratio"] >= float(target) if op == ">=" else g["ratio"] <= float(target)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    for kind in ("torch", "mlx"):
        s = settings[kind]
        names = [n for n in rows if rows[n]["kind"] == kind]
        if not names:
            continue
        peak = torch_peak if kind == "torch" else mlx_peak
        table = Table(title=f"LoRA fine-tuning, SmolLM2-135M fp32, {kind}: batch {s['batch']} x {s['seq']} tokens, "
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
    for col in ("comparison", "ratio", "goal", "met"):
        gt.add_column(col)
    for name, g in goals.items():
        if g["ratio"] is not None:
            gt.add_row(name, f"{g['ratio']:.3f}", g["goal"], "yes" if g["met"] else "NO")
    console.print(gt)
    console.print("FLOPs/token = 4N + 12*layers*c*d + 6*layers*sum(r*(in+out)), c = (L+1)/2; "
                  f"N = {flops_per_token(model_path, args.seq)['params'] / 1e6:.1f}M. "
                  f"Peaks: torch {torch_peak / 1e9:.0f} GFLOP/s (fp32 2048^3 matmul), "
                  f"mlx {mlx_peak / 1e9:.1f} GFLOP/s (fp32 1024^3 matmul). {elapsed:.0f} s in all.")


    from localforge.backends import REGISTRY
    from localforge.finetune.report import versions

    result = {
        "machine": machine(),
        "versions": {**versions(tuple(p for s in REGISTRY.values() for p in s.packages)),
                     **{p: _version(p) for p in ("trl", "datasets")}},
        "settings": {"threads": threads, "rounds": args.rounds, "lora": LORA, "learning_rate": LR,
                     **{k: {x: v[x] for x in ("steps", "seq", "batch")} for k, v in settings.items()}},
        "flops_formula": "4*N + 12*layers*((L+1)/2)*d + 6*layers*sum(r*(in+out) over LoRA targets)",
        "flops_per_token": {k: flops_per_token(model_path, settings[k]["seq"]) for k in settings},
        "peak_flops": {"torch": torch_peak, "mlx": mlx_peak, "rounds": peaks},
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
