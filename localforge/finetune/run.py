"""A fine-tuning run, start to finish, and its resume: the engine-neutral driver.

``start`` validates the config, plans for this machine and writes the run folder:

    RUN_DIR/config.yaml      the config as run: every ``auto`` replaced by the planned value
    RUN_DIR/run.json         the model folder, the plan and the data files' hashes
    RUN_DIR/metrics.jsonl    one line per step ({"step", "loss", ...}) and per evaluation
    RUN_DIR/checkpoints/step-00000050/trainer_state.json   the driver's: step, total, lr
    RUN_DIR/checkpoints/step-00000050/engine/              the engine's: adapter, optimizer, RNG
    RUN_DIR/adapter/         the final adapter in the engine's native format
    RUN_DIR/manifest.json, RUN_DIR/loss.png

``train`` runs (or continues) the run in a folder: it loads the newest checkpoint if there is
one, so resuming is the same call. Data order is a pure function of (seed, step), and the
learning rate of (config, step), so the engine's state + step is all a resume needs to follow
the curve of an uninterrupted run. Ctrl-C finishes the current step, saves a checkpoint and
exits. The driver talks to the engine through ``backends.training.Trainer`` only, and reports
progress through a callback (``on_event``); it draws nothing itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from localforge.backends.training import CorruptCheckpoint
from localforge.errors import ConfigError, LocalforgeError
from localforge.files import sha256_file
from localforge.finetune.config import FinetuneConfig, load_config
from localforge.finetune.planner import (
    ModelShape,
    Plan,
    engine_problems,
    model_problems,
    planned_compile,
    planned_kernels,
)
from localforge.finetune.report import (
    final_metrics,
    peak_rss_bytes,
    plot_loss,
    read_metrics,
    versions,
    write_json,
)
from localforge.settings import key_error

if TYPE_CHECKING:
    from localforge.backends.training import Batch, Trainer
    from localforge.finetune.batches import Schedule
    from localforge.finetune.data import Dataset

ENGINE_DIR = "engine"  # the engine's own subfolder of a checkpoint
Events = Callable[..., None]  # on_event(kind, **data): "start", "step", "eval", "checkpoint"


class TrainingInterrupted(LocalforgeError):
    exit_code = 130


CorruptFile = CorruptCheckpoint  # a run's file (a checkpoint, its state) that cannot be read back


def _read_json(path: Path, hint: str = "") -> dict:
    """A JSON object from a run's file, or ``CorruptFile`` naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptFile(path, "missing", hint) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptFile(path, _first_line(exc), hint) from None
    if not isinstance(data, dict):
        raise CorruptFile(path, f"expected a JSON object, got {type(data).__name__}", hint)
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def lr_at(step: int, total: int, cfg: FinetuneConfig) -> float:
    """Learning rate of 0-based ``step``: linear warmup, then constant, linear or cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return cfg.learning_rate * (1 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.config = self.path / "config.yaml"
        self.info = self.path / "run.json"
        self.metrics = self.path / "metrics.jsonl"
        self.manifest = self.path / "manifest.json"
        self.plot = self.path / "loss.png"
        self.adapter = self.path / "adapter"  # a LoRA/DoRA run's output
        self.model = self.path / "model"  # a full run's output: a model folder (weights, config, tokenizer)
        self.checkpoints = self.path / "checkpoints"
        self.created: Path | None = None  # the topmost folder a start made for this run (``discard`` removes it)

    def exists(self) -> bool:
        return self.info.exists()

    def started(self) -> bool:
        """Whether training has done a step here (a start that failed before one leaves nothing to resume)."""
        return bool(self.metrics.exists() and self.metrics.read_text().strip()) or bool(self.checkpoint_dirs())

    def discard(self) -> None:
        """Remove what a start wrote: the folders it made (``created``, the topmost), else the run's files."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        for f in (self.config, self.info, self.metrics, self.manifest, self.plot):
            f.unlink(missing_ok=True)
        for d in (self.checkpoints, self.adapter, self.model):
            shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def engine_dir(checkpoint: Path) -> Path:
        """The engine's files in a checkpoint (checkpoints written before the split hold them at the top)."""
        engine = checkpoint / ENGINE_DIR
        return engine if engine.is_dir() else checkpoint

    def checkpoint_dirs(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if (p / "trainer_state.json").exists())

    def latest(self) -> Path | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None

    def append_metric(self, row: dict) -> None:
        with open(self.metrics, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Forget what was logged after ``step`` (the steps a resume will redo)."""
        rows = [r for r in read_metrics(self.metrics) if r["step"] <= step]
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- starting --------------------------------------------------------------------------------------
class Prepared(NamedTuple):
    cfg: FinetuneConfig
    data: Dataset
    model_path: str
    shape: ModelShape
    plan: Plan


def prepare(config_path: str | Path | None, overrides: list[str] = (), flags: dict | None = None,
            force: bool = False) -> Prepared:
    """Config, data, model folder, shape and plan for this machine, every check done; nothing written.

    ``flags``: command-line values by config key ({"backend": ("--backend", "mlx")}, see ``settings``).
    Checks against the model (LoRA targets, layers, context) and the plan (the predicted peak
    within the memory budget; ``force`` lets a start go beyond it) raise a ``ConfigError`` that
    names the key and where it was set.
    """
    from localforge.backends import ensure_hf, installed, trainers
    from localforge.finetune.data import load_data
    from localforge.finetune.planner import over_budget, plan
    from localforge.hardware import HardwareProfile
    from localforge.models import resolve

    cfg = load_config(config_path, overrides, flags)
    if not Path(cfg.data).expanduser().exists():
        raise key_error("data", f"{cfg.data} does not exist: give a JSONL file or a folder with train.jsonl",
                        config_path, overrides, flags)
    cfg.data = str(Path(cfg.data).expanduser().resolve())
    data = _grpo_data(cfg) if cfg.method == "grpo" else load_data(cfg.data)
    model_path = ensure_hf(resolve(cfg.model))
    shape = ModelShape.from_hf_config(model_path)
    for key, what in model_problems(cfg, shape):
        raise key_error(key, what, config_path, overrides, flags)
    longest = None
    if cfg.method == "grpo":
        _check_prompts(cfg, data, model_path)
    else:
        longest = _check_rows(cfg, data, model_path)
    p = plan(HardwareProfile.detect(), shape, cfg, installed(trainers()), longest=longest)
    _method_installed(p.backend, cfg.method, config_path, overrides, flags)
    for key, what in engine_problems(cfg, p, shape) + _toolchain_problems(p):
        raise key_error(key, what, config_path, overrides, flags)
    too_big = over_budget(p, cfg)
    if too_big and not force:
        raise key_error(*too_big, config_path, overrides, flags)
    if too_big:
        p.reasons.append("forced: the predicted peak exceeds the memory budget; expect swapping or out-of-memory")
    return Prepared(cfg, data, model_path, shape, p)


def _method_installed(backend: str, method: str, config_path, overrides, flags) -> None:
    """What the engine needs for this method beyond itself (grpo: its RL trainer) is installed."""
    from importlib.util import find_spec

    from localforge.backends import spec

    s = spec(backend)
    missing = [m for m in s.method_requires.get(method, ()) if find_spec(m) is None]
    if missing:
        dist = dict(zip(s.method_requires[method], s.method_packages.get(method, ()), strict=False))
        raise key_error("method", f"{s.label} trains {method} through {dist.get(missing[0], missing[0])}, which is "
                                  f"not installed here: pip install 'localforge[{s.extra}]' (Python >= 3.11), "
                                  f"or choose another backend", config_path, overrides, flags)


def _toolchain_problems(p: Plan) -> list[tuple[str, str]]:
    """What the planned kernels and compiling need from this machine and it lacks, as (config key,
    what is wrong): the kernel set's package, a C++ compiler for torch.compile on a CPU."""
    from importlib.util import find_spec

    from localforge.backends import spec

    out, s = [], spec(p.backend)
    ks = s.kernels.get(p.kernels)
    if ks is not None and find_spec(ks.requires) is None:
        out.append(("kernels", f"{p.kernels} needs {ks.package}, which is not installed here: {ks.install}, "
                               f"or set kernels: auto"))
    cxx = os.environ.get("CXX") or "g++"  # what torch's inductor builds its CPU kernels with
    if p.compile and p.device == "cpu" and shutil.which(cxx) is None:
        out.append(("compile", f"compiling on a CPU builds C++ kernels with {cxx}, which this machine lacks: "
                               f"install it (or point $CXX at a compiler), or set compile: auto"))
    return out


def _grpo_data(cfg: FinetuneConfig):
    """A GRPO run's rows, with its rewards and student checked first (a bad reward name or option
    is one line naming ``grpo.rewards``, before the data is read)."""
    from localforge.finetune.data import load_prompts
    from localforge.finetune.rewards import bind, check_student, needs_fields

    check_student(cfg.grpo.student, cfg.grpo.rewards)
    for r in cfg.grpo.rewards:
        bind(r.name, r.options, r.weight, student=True)
    return load_prompts(cfg.data, needs_fields(cfg.grpo.rewards))


def _check_prompts(cfg: FinetuneConfig, data, model_path: str) -> None:
    """Every GRPO prompt, through the model's chat template, within grpo.max_prompt_length (prompt
    plus completion within the model's context is ``model_problems``' check)."""
    from importlib.util import find_spec

    from localforge.backends import load_tokenizer
    from localforge.finetune.batches import prompt_ids

    if find_spec("transformers") is None:
        return
    tokenizer = load_tokenizer(model_path)
    limit = cfg.grpo.max_prompt_length
    for split, rows in data.splits.items():
        for n, row in enumerate(rows, 1):
            ids = prompt_ids(tokenizer, row.messages)
            if len(ids) > limit:
                raise ConfigError(f"{data.files[split]} row {n}: the prompt is {len(ids)} tokens, more than "
                                  f"grpo.max_prompt_length {limit}: raise it or shorten the prompt")


def _check_rows(cfg: FinetuneConfig, data, model_path: str) -> int | None:
    """Every row, through the model's own tokenizer (the one each engine trains with), keeps
    something to learn within max_seq_length: found in --dry-run, not at the first step. Returns
    the longest training row in tokens (what the planner sizes unpacked batches by), or None
    where the tokenizer cannot be read here."""
    from importlib.util import find_spec

    from localforge.backends import load_tokenizer
    from localforge.finetune.batches import encode_all

    if find_spec("transformers") is None:  # the engine's trainer checks the same when it starts
        return None
    tokenizer = load_tokenizer(model_path)
    longest = None
    for split, rows in data.splits.items():
        seqs = encode_all(tokenizer, rows, cfg.mask_prompt, cfg.max_seq_length, where=data.files[split])
        if split == "train":
            longest = max(len(s) for s in seqs)
    return longest


def _as_run(cfg: FinetuneConfig, p: Plan) -> dict:
    """The config with every ``auto`` replaced by what the plan chose."""
    out = cfg.model_dump()
    out.update(backend=p.backend, batch_size=p.batch_size, grad_accum=p.grad_accum, dtype=p.dtype,
               gradient_checkpointing=p.gradient_checkpointing, num_processes=p.processes, packing=p.packing,
               kernels=p.kernels, compile=p.compile)
    if p.lora_rank is not None:
        out["lora"].update(rank=p.lora_rank, layers=p.lora_layers)
    if cfg.method == "grpo":
        out["grpo"].update(num_generations=p.num_generations, max_completion_length=p.max_completion_length)
    return out


def start(config_path: str | Path | None, overrides: list[str] = (), flags: dict | None = None,
          force: bool = False) -> tuple[RunDir, Prepared]:
    """Validate, plan, and write a new run folder (refusing to overwrite a run). Every check runs
    before the folder is made, and a failure while writing it removes it again.
    ``force``: start even when the predicted peak exceeds the memory budget."""
    prepared = prepare(config_path, overrides, flags, force)
    cfg, data, model_path, shape, p = prepared
    run = RunDir(cfg.output_dir)
    if run.exists():
        raise ConfigError(f"{run.path} already holds a run: continue it with `localforge finetune resume "
                          f"{run.path}`, or set output_dir to a new folder")
    if not run.path.exists():
        run.created = run.path
        while not run.created.parent.exists():
            run.created = run.created.parent
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        run.config.write_text(yaml.safe_dump(_as_run(cfg, p), sort_keys=False))
        write_json(run.info, {"model_path": model_path, "model_params": shape.params, "plan": p.to_dict(),
                              "data_files": {s: {"path": f, "sha256": sha256_file(f)} for s, f in data.files.items()},
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError as exc:
        run.discard()
        raise ConfigError(f"output_dir {run.path}: cannot write the run folder ({exc.strerror or exc})") from None
    return run, prepared


def reopen(run_dir: str | Path, overrides: list[str] = ()) -> tuple[RunDir, Plan]:
    """Check a run folder before resuming it; apply overrides (e.g. ``steps=400``) to its config."""
    run = RunDir(run_dir)
    if not run.exists():
        raise ConfigError(f"{run.path} is not a localforge run folder (no run.json): give the output_dir of a run")
    cfg = load_config(run.config, overrides)
    info = _read_json(run.info)
    if overrides:
        from dataclasses import replace

        shape = ModelShape.from_hf_config(info["model_path"])
        # the kernels and compiling an override asks for, on the engine and device the run has
        asked = replace(Plan(**info["plan"]), kernels=planned_kernels(cfg), compile=planned_compile(cfg))
        for key, what in model_problems(cfg, shape) + engine_problems(cfg, asked, shape) + _toolchain_problems(asked):
            raise key_error(key, what, run.config, overrides)
    for split, f in info["data_files"].items():
        if not Path(f["path"]).exists() or sha256_file(f["path"]) != f["sha256"]:
            raise ConfigError(f"{f['path']} ({split} data) changed or is gone since the run began: resuming would "
                              f"not replay the same data; restore it, or start a new run")
    if overrides:
        run.config.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    return run, Plan(**info["plan"])


# -- training --------------------------------------------------------------------------------------
@contextmanager
def _stop_on_signal():
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second Ctrl-C stops at once."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handlers
        old = {}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _setup(cfg: FinetuneConfig, model_path: str, rewards=None):
    from localforge.backends.training import GrpoSetup, TrainSetup

    grpo = None
    if rewards is not None:
        g = cfg.grpo
        grpo = GrpoSetup(num_generations=int(g.num_generations), max_completion_length=int(g.max_completion_length),
                         beta=g.beta, epsilon=g.epsilon, temperature=g.temperature, top_p=g.top_p,
                         scale_rewards=g.scale_rewards, batch_size=int(cfg.batch_size), grad_accum=int(cfg.grad_accum),
                         reward_names=rewards.names, reward_weights=rewards.weights,
                         score=rewards.score)
    return TrainSetup(model_path=model_path, method=cfg.weights, grpo=grpo, rank=int(cfg.lora.rank), alpha=cfg.lora.alpha,
                      dropout=cfg.lora.dropout, targets=list(cfg.lora.targets),
                      layers=None if cfg.lora.layers in (None, "auto") else int(cfg.lora.layers),
                      dtype=cfg.dtype, gradient_checkpointing=bool(cfg.gradient_checkpointing), seed=cfg.seed,
                      weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                      kernels=planned_kernels(cfg), compile=planned_compile(cfg))


class _Data(NamedTuple):
    schedule: Schedule
    total: int  # steps in the run
    valid: list[Batch] | None


def _tokenized(cfg: FinetuneConfig, tokenizer) -> _Data:
    """The run's data through the engine's tokenizer: the step schedule and the validation batches."""
    from localforge.finetune.batches import Schedule, as_rows, encode_all, eval_batches
    from localforge.finetune.data import load_data

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.method == "grpo":
        from localforge.finetune.data import load_prompts

        rows = load_prompts(cfg.data).splits["train"]
        sched = Schedule([[r] for r in rows], int(cfg.batch_size), int(cfg.grad_accum), int(cfg.num_processes),
                         cfg.seed, pad)
        return _Data(sched, cfg.steps or sched.steps_for_epochs(cfg.epochs), None)
    data = load_data(cfg.data)
    seqs = encode_all(tokenizer, data.splits["train"], cfg.mask_prompt, cfg.max_seq_length, where=data.files["train"])
    sched = Schedule(as_rows(seqs, cfg.packing is True, cfg.max_seq_length, cfg.seed), int(cfg.batch_size),
                     int(cfg.grad_accum), int(cfg.num_processes), cfg.seed, pad, cfg.max_seq_length)
    valid = None
    if "valid" in data.splits:
        vseqs = encode_all(tokenizer, data.splits["valid"], cfg.mask_prompt, cfg.max_seq_length,
                           where=data.files["valid"])
        valid = eval_batches(vseqs, int(cfg.batch_size), pad, cfg.eval_batches, cfg.max_seq_length)
    return _Data(sched, cfg.steps or sched.steps_for_epochs(cfg.epochs), valid)


def _engine(cfg: FinetuneConfig, model_path: str, rewards=None) -> tuple[Trainer, tuple[str, ...]]:
    """The trainer of the config's engine, and the packages its manifest records."""
    from localforge.backends import load, require

    spec = require(cfg.backend)
    packages = spec.packages + spec.method_packages.get(cfg.method, ())
    return load(spec.trainer)(_setup(cfg, model_path, rewards)), packages


def _checkpoint_state(run: RunDir) -> tuple[Path, int, str] | None:
    """The newest checkpoint, its step and what to do if it is damaged; None without one. Its
    ``trainer_state.json`` is read here, before the engine loads (a bad one fails at once)."""
    ckpt = run.latest()
    if ckpt is None:
        return None
    older = run.checkpoint_dirs()[:-1]
    hint = (f"delete {ckpt} to resume from {older[-1].name}" if older
            else f"delete {ckpt} to train this run again from the start")
    state_file = ckpt / "trainer_state.json"
    step = _read_json(state_file, hint).get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise CorruptFile(state_file, f"no step number (got {step!r})", hint)
    return ckpt, step, hint


def _resume(run: RunDir, trainer: Trainer, main: bool, state: tuple[Path, int, str] | None) -> tuple[int, str | None]:
    """Load the newest checkpoint into the engine, if there is one; the step to continue from.
    A checkpoint that cannot be read back is ``CorruptCheckpoint`` naming the file, in one line."""
    if state is None:
        return 0, None
    ckpt, step, hint = state
    engine = run.engine_dir(ckpt)
    try:
        trainer.load(engine)
    except CorruptCheckpoint as exc:
        raise CorruptFile(exc.path, exc.why, hint) from None
    except LocalforgeError:
        raise
    except Exception as exc:  # anything the engine's readers raise on bytes they cannot make sense of
        raise CorruptFile(engine, _first_line(exc), hint) from None
    if main:
        run.truncate_metrics(step)
    return step, str(ckpt)


def train(run_dir: str | Path, on_event: Events | None = None, stop_after: int | None = None) -> dict:
    """Run or continue the run in ``run_dir``; return its manifest.

    ``on_event(kind, **data)`` hears of progress, from the main process only: "start" (step,
    total), "step" (step, loss, tokens_per_second), "eval" (step, eval_loss) and "checkpoint"
    (step, path). ``stop_after`` ends the session after that many steps as Ctrl-C would
    (checkpoint and exit with ``TrainingInterrupted``): for tests and for splitting a run.

    However the session ends, the manifest says so: "completed", "interrupted" or "failed", with
    the one-line reason (``reason``) when it did not complete.
    """
    from localforge.hardware import HardwareProfile

    run = RunDir(run_dir)
    if not run.exists():
        raise ConfigError(f"{run.path} is not a localforge run folder (no run.json): give the output_dir of a run")
    main = int(os.environ.get("RANK", "0")) == 0  # accelerate's; the trainer says the same once it exists
    try:
        cfg = load_config(run.config)
        info = _read_json(run.info)
        info["hardware"] = json.loads(HardwareProfile.detect().model_dump_json())  # this session's machine
        return _session(run, cfg, info, on_event, stop_after)
    except TrainingInterrupted as exc:
        if main:
            _mark(run, "interrupted", str(exc))
        raise
    except KeyboardInterrupt:
        if main:
            _mark(run, "interrupted", "stopped at once by a second Ctrl-C (no checkpoint for the last steps)")
        raise
    except BaseException as exc:
        if main:
            _mark(run, "failed", str(exc).strip().splitlines()[0] if isinstance(exc, LocalforgeError)
                  and str(exc).strip() else _first_line(exc))
        raise


def _mark(run: RunDir, status: str, reason: str) -> None:
    """Record how a session ended in the manifest (the one it wrote, or a short one if it wrote none)."""
    try:
        manifest = _read_json(run.manifest)
    except CorruptFile:
        manifest = {"run_dir": str(run.path)}
    manifest.update(status=status, reason=reason, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        write_json(run.manifest, manifest)
    except OSError:
        pass  # the disk refuses even this: the error itself still reaches the caller


def _session(run: RunDir, cfg: FinetuneConfig, info: dict, on_event: Events | None, stop_after: int | None) -> dict:
    from localforge.finetune.batches import input_tokens, learned_tokens

    state = _checkpoint_state(run)
    rewards = _rewards(cfg) if cfg.method == "grpo" else None
    try:
        trainer, packages = _engine(cfg, info["model_path"], rewards)
    except BaseException:
        if rewards is not None:
            rewards.close()
        raise
    try:
        data = _tokenized(cfg, trainer.tokenizer)
        if trainer.world_size != data.schedule.world_size:
            raise ConfigError(f"config num_processes={data.schedule.world_size} but {trainer.world_size} processes "
                              f"are running: launch with `localforge finetune` (it starts accelerate itself)")
        main = trainer.rank == 0

        def emit(kind: str, **event) -> None:  # one process reports; the others train in step with it
            if on_event is not None and main:
                on_event(kind, **event)

        step, resumed_from = _resume(run, trainer, main, state)
        history = read_metrics(run.metrics)
        began, train_seconds, tokens_seen = time.time(), 0.0, 0

        def manifest(status: str, output: dict | None = None) -> dict:
            return _manifest(run, cfg, info, trainer, packages, status, history, resumed_from, train_seconds,
                             tokens_seen, wall=time.time() - began if status != "running" else 0.0, output=output)

        if main:
            write_json(run.manifest, manifest("running"))
        emit("start", step=step, total=data.total)
        interrupted = False
        with _stop_on_signal() as flag:
            while step < data.total:
                lr = lr_at(step, data.total, cfg)
                rows = data.schedule.step_rows(step)
                t0 = time.perf_counter()
                if rewards is not None:
                    rewards.step = step
                    got = trainer.grpo_step(step, _prompts(data.schedule, rows, trainer.rank), lr)
                    loss, inputs = float(got["loss"]), int(got.get("tokens", 0))
                    extra = {k: round(float(v), 6) for k, v in got.items() if k not in ("loss", "tokens")}
                else:
                    step_tokens, inputs = learned_tokens(rows), input_tokens(rows)
                    loss = trainer.step(step, data.schedule.split(rows, trainer.rank), lr, step_tokens) / max(1, step_tokens)
                    extra = {"loss_tokens": step_tokens}
                seconds = time.perf_counter() - t0
                train_seconds += seconds
                tokens_seen += inputs
                step += 1
                _log(run, history, main, {"step": step, "loss": loss, "lr": lr, "tokens": inputs, **extra,
                                          "seconds": round(seconds, 4)})
                emit("step", step=step, loss=loss, tokens_per_second=tokens_seen / train_seconds,
                     **({"reward": extra["reward"]} if "reward" in extra else {}))
                if data.valid and (step % cfg.eval_every == 0 or step == data.total):
                    total, n = trainer.eval_loss(data.valid)
                    _log(run, history, main, {"step": step, "eval_loss": total / max(1, n)})
                    emit("eval", step=step, eval_loss=total / max(1, n))
                stopping = flag["stop"] or (stop_after is not None and step >= stop_after and step < data.total)
                interrupted = trainer.sync(stopping)
                if step % cfg.save_every == 0 or step == data.total or interrupted:
                    emit("checkpoint", step=step, path=str(_checkpoint(run, trainer, step, data.total, lr,
                                                                        cfg.keep_checkpoints, main)))
                if interrupted:
                    break

        saved = None
        if step >= data.total and main:
            out = run.model if cfg.weights == "full" else run.adapter
            try:
                saved = trainer.export(out)
            except OSError as exc:
                raise LocalforgeError(f"could not write the trained {'model' if cfg.weights == 'full' else 'adapter'}"
                                      f" to {out}: {exc.strerror or exc}") from None
        final = manifest("completed" if step >= data.total else "interrupted", saved)
    finally:
        trainer.close()  # free the model before drawing (and when the session failed)
        if rewards is not None:
            rewards.close()
    if main:
        if interrupted:
            final["reason"] = f"stopped at step {step} of {data.total}"
        write_json(run.manifest, final)
        plot_loss(history, run.plot, f"{cfg.model} {cfg.method} on {cfg.backend} ({Path(cfg.data).name})",
                  rewards=cfg.method == "grpo")
    if interrupted:
        raise TrainingInterrupted(f"stopped at step {step} of {data.total}; checkpoint saved in {run.latest()}: "
                                  f"continue with `localforge finetune resume {run.path}`")
    return final


def _rewards(cfg: FinetuneConfig):
    """The config's rewards bound to their options (and the teaching reward's student, loaded)."""
    from localforge.finetune.rewards import NEEDS_STUDENT, Rewards, Student

    student = Student(cfg.grpo.student) if any(r.name in NEEDS_STUDENT for r in cfg.grpo.rewards) else None
    return Rewards(cfg.grpo.rewards, student)


def _prompts(schedule: Schedule, rows: list, rank: int):
    """Process ``rank``'s prompts of one GRPO step: its micro-batches' rows, in order."""
    from localforge.backends.training import PromptBatch

    mine = [r[0] for chunk in schedule.micro_rows(rows, rank) for r in chunk]
    return PromptBatch([r.messages for r in mine], [r.fields for r in mine])


def _log(run: RunDir, history: list[dict], main: bool, row: dict) -> None:
    history.append(row)
    if main:
        run.append_metric(row)


def _checkpoint(run: RunDir, trainer: Trainer, step: int, total: int, lr: float, keep: int, main: bool) -> Path:
    """Write checkpoints/step-N atomically (a temp folder renamed into place), then prune old ones:
    the engine's state in its own subfolder, the driver's ``trainer_state.json`` beside it. A write
    that fails (disk full, no permission) leaves no partial checkpoint and raises a one-line error."""
    final = run.checkpoints / f"step-{step:08d}"
    tmp = run.checkpoints / f".step-{step:08d}.tmp"
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / ENGINE_DIR).mkdir(parents=True)
        trainer.barrier()
        trainer.save(tmp / ENGINE_DIR)
        trainer.barrier()
        if main:
            write_json(tmp / "trainer_state.json", {"step": step, "total_steps": total, "lr": lr})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    except OSError as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise LocalforgeError(f"could not write checkpoint {final}: {exc.strerror or exc}"
                              f"{f' ({exc.filename})' if getattr(exc, 'filename', None) else ''}") from None
    if main:
        for old in run.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    trainer.barrier()
    return final


def _manifest(run: RunDir, cfg: FinetuneConfig, info: dict, trainer: Trainer, packages: tuple[str, ...],
              status: str, history: list[dict], resumed_from: str | None, train_seconds: float, tokens: int,
              wall: float = 0.0, output: dict | None = None) -> dict[str, Any]:
    """``output`` is what the run made (kind: adapter or model, format, path); ``adapter`` the same
    for a LoRA/DoRA run, None for a full run (whose output is a model folder)."""
    full = cfg.weights == "full"
    metrics = final_metrics(history)
    metrics.update(train_seconds=round(train_seconds, 3), wall_seconds=round(wall, 3),
                   tokens_per_second=round(tokens / train_seconds, 2) if train_seconds else None,
                   peak_rss_bytes=peak_rss_bytes(), trainable_params=trainer.trainable_params,
                   total_params=trainer.total_params)
    # what the process held next to what the planner predicted (on CUDA: the allocator's peaks
    # and NVML's count; elsewhere the host's peak RSS is the device's memory)
    device = getattr(trainer, "memory", lambda: {})()
    metrics["memory"] = {"device": device.get("device", info["plan"].get("device")),
                         "predicted_peak_bytes": info["plan"].get("predicted_peak_bytes"),
                         "host_peak_rss_bytes": metrics["peak_rss_bytes"],
                         **{k: v for k, v in device.items() if k != "device"}}
    return {
        "status": status,
        "run_dir": str(run.path.resolve()),
        "model": cfg.model,
        "model_path": info["model_path"],
        "adapter": None if full else output,
        "output": output,
        "resumed_from": resumed_from,
        "seed": cfg.seed,
        "config": cfg.model_dump(),
        "plan": info["plan"],
        "data_files": info["data_files"],
        "hardware": info["hardware"],
        "versions": versions(packages),
        "processes": trainer.world_size,
        "metrics": metrics,
    }


__all__ = ["CorruptFile", "RunDir", "TrainingInterrupted", "lr_at", "prepare", "reopen", "start", "train"]
