"""``localforge run PIPELINE.yaml``: documents -> records -> pairs -> dataset -> fine-tuned,
evaluated, exported model, each stage through its job's own code, in one resumable run folder.

A stage's key is the hash of its settings (its section of the pipeline file) and of its inputs'
contents (the files the previous stage wrote). The run's manifest records, per stage, the key it
ran with, its outputs' hashes and its figures. A stage is skipped when its key is the one recorded
as done and its outputs still hash as recorded; a changed setting changes that stage's key, so it
runs again from scratch, and the stages after it run again only when what it wrote changed (their
inputs' hashes). A stage that was running when the process died runs again with the same key, so
its job resumes itself (extract and teach skip finished items, finetune continues from its newest
checkpoint, eval asks only what is missing, an export starts over). A stage whose items partly
failed (a bad document) is recorded with its failures: the run goes on with what it made, ends with
exit code 1, and a re-run tries the failed items again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from localforge.errors import ConfigError, LocalforgeError, UsageError
from localforge.files import write_atomic
from localforge.finetune.report import versions
from localforge.pipeline.layout import Layout, digest
from localforge.pipeline.settings import STAGES, PipelineSettings, load_pipeline
from localforge.pipeline.stages import STAGE_TABLE, Context, Outcome, remove

Events = Callable[..., None]


def _default_train(run_dir: Path, processes: int, on_event: Events) -> dict:
    from localforge.finetune.run import train

    if processes > 1:
        raise ConfigError(f"the finetune plan wants {processes} processes: run the pipeline through "
                          "`localforge run`, which launches them, or set finetune.num_processes=1")
    return train(run_dir, on_event=on_event)


def check_stage(name: str | None, flag: str) -> str | None:
    if name is not None and name not in STAGES:
        raise UsageError(f"{flag} {name!r}: choose one of {', '.join(STAGES)}")
    return name


def prepare(path: str | Path, overrides: list[str] = (), flags: dict | None = None) -> tuple[PipelineSettings, list[Path]]:
    """The pipeline checked at the edge, before any stage runs or any folder is made: every section
    as its job validates it, the documents found, the student and its LoRA settings against the
    model, the export's converter installed. Returns the settings and the document files."""
    from localforge.backends import EXPORT_TARGETS, converter, ensure_hf
    from localforge.extract.pipeline import Summary, discover
    from localforge.finetune.planner import ModelShape, model_problems
    from localforge.models import resolve
    from localforge.settings import key_error

    s = load_pipeline(path, overrides, flags)
    if s.finetune.method == "grpo":
        raise key_error("finetune.method", "grpo trains on prompts and rewards; the pipeline makes answer pairs: "
                        "use lora, dora or full (and `localforge finetune` for GRPO)", path, overrides, flags)
    found = Summary()
    files = discover([Path(p) for p in s.documents], found)
    if not files:
        raise ConfigError(f"{path}: documents: " + "; ".join(f"{p}: {why}" for p, why in found.failed))
    shape = ModelShape.from_hf_config(ensure_hf(resolve(s.finetune.model)))
    for key, what in model_problems(s.finetune, shape):
        raise key_error(f"finetune.{key}", what, path, overrides, flags)
    if s.export is not None and EXPORT_TARGETS[s.export.to].gguf:
        converter()
    _servers_answer(s)
    root = s.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_dir {root}: is a file; give a folder for the run")
    return s, sorted(files)


def _servers_answer(s: PipelineSettings) -> None:
    """Each role's model is there (a local file's headers checked) and each role on a server (the
    teacher on Ollama, LM Studio, a hosted API) answers now, so a missing model or an unreachable
    server is one line before any folder is made rather than a failed stage."""
    from localforge.backends import get_backend, resolve_auto, spec
    from localforge.models import resolve

    roles = {"teacher": s.extract, "generate.teacher": s.generate.teacher}
    if s.dcr is not None:
        roles |= {"dcr.teacher": s.dcr.teacher, "dcr.student": s.dcr.student}
    seen = set()
    for where, role in roles.items():
        try:
            name = role.backend if role.backend != "auto" else resolve_auto(role.model.split(",")[0])
            if not spec(name).server:
                for model in role.model.split(","):
                    resolve(model.strip())
        except LocalforgeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        key = (name, role.model, role.base_url)
        if not spec(name).server or key in seen:
            continue
        seen.add(key)
        with get_backend(name, role.model, **role.backend_options()) as backend:
            health = backend.health()
        if not health.ok:
            raise ConfigError(f"{where} ({name}, {role.model}): {health.detail}")


class RunRecord:
    """The run's manifest: the pipeline, and per stage its key, status, outputs' hashes, figures."""

    def __init__(self, layout: Layout):
        self.path = layout.manifest
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        except ValueError:
            self.data = {}  # a manifest cut by a crash: every stage is checked again
        self.data.setdefault("stages", {})

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_atomic(self.path, json.dumps(self.data, indent=2, default=str) + "\n")


def _key(ctx: Context, name: str) -> tuple[str, dict]:
    import hashlib

    inputs = {}
    for label, p in ctx.layout.names(STAGE_TABLE[name].inputs(ctx)).items():
        h = digest(p)
        if h is None:
            raise ConfigError(f"stage {name}: its input {p} is missing: run the stages before it "
                              f"(without --from), or restore the file")
        inputs[label] = h
    key = hashlib.sha256(json.dumps({"settings": ctx.settings.digest(name), "inputs": inputs},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return key, inputs


def _intact(rec: dict, layout: Layout) -> bool:
    return all(digest(layout.root / p) == h for p, h in (rec.get("outputs") or {}).items())


def run(path: str | Path, overrides: list[str] = (), flags: dict | None = None, *, start: str | None = None,
        until: str | None = None, on_event: Events | None = None, train: Callable[..., dict] | None = None,
        prepared: tuple[PipelineSettings, list[Path]] | None = None) -> dict:
    """Run (or continue) the pipeline at ``path``; return the run's manifest.

    ``start``: stages before it are taken as they are (their files must be there) and it and the
    ones after it run even when unchanged; ``until``: stop after that stage. ``on_event(kind,
    **data)``: "stage" (stage, status: run, skip, done, off), "progress" (stage, total, completed,
    advance, grow, info), "failed" (stage, reason), "plan" (stage, plan). ``train(run_dir, processes,
    on_event)`` trains the finetune stage's run (the face passes one that launches several processes).
    """
    from filelock import FileLock, Timeout

    emit = on_event or (lambda kind, **data: None)
    check_stage(start, "--from")
    check_stage(until, "--until")
    if start and until and STAGES.index(start) > STAGES.index(until):
        raise UsageError(f"--from {start} comes after --until {until}")
    settings, documents = prepared or prepare(path, overrides, flags)
    layout = Layout(settings.root)
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(layout.lock, timeout=0)
        lock.acquire()
    except Timeout:
        raise ConfigError(f"output_dir {layout.root}: another `localforge run` is using it; wait for it, "
                          "or set output_dir to another folder") from None
    except OSError as exc:
        raise ConfigError(f"output_dir {layout.root}: cannot write there ({exc.strerror or exc})") from None
    try:
        record = RunRecord(layout)
        write_atomic(layout.settings, yaml.safe_dump(settings.model_dump(mode="json", by_alias=True, exclude={"extract": {"pdf_password"}}),
                                                     sort_keys=False))
        record.data.update(pipeline=str(Path(path).absolute()), settings=str(layout.settings),
                           documents=[str(d) for d in documents], status="running", reason=None,
                           started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        record.data.setdefault("created", record.data["started"])
        record.save()
        ctx = Context(settings, layout, documents, emit, train or _default_train)
        try:
            failures = _stages(ctx, record, start, until)
        except KeyboardInterrupt:
            record.data.update(status="interrupted", reason="stopped by Ctrl-C: run it again to continue")
            record.save()
            raise
        except BaseException as exc:
            reason = str(exc).strip().splitlines()[0] if isinstance(exc, LocalforgeError) and str(exc).strip() \
                else f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            record.data.update(status="failed", reason=reason)
            record.save()
            raise
        done = until is None or until == STAGES[-1]
        record.data.update(status=("completed" if not failures else "completed with failures") if done else "stopped",
                           reason=(f"{len(failures)} items failed; run it again to retry them" if failures else None)
                           if done else f"--until {until}",
                           versions=versions(), hardware=_hardware(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        record.save()
        return record.data
    finally:
        lock.release()


def _stages(ctx: Context, record: RunRecord, start: str | None, until: str | None) -> list[str]:
    failures: list[str] = []
    for name in STAGES:
        ctx.stage = name
        stage = STAGE_TABLE[name]
        if name == "dcr" and ctx.settings.dcr is None or name == "export" and ctx.settings.export is None:
            record.stages[name] = {"status": "off"}
            emit_stage(ctx, "off")
            continue
        rec = record.stages.get(name) or {}
        if start is not None and STAGES.index(name) < STAGES.index(start):
            if rec.get("status") != "done" or not _intact(rec, ctx.layout):
                raise ConfigError(f"--from {start}: stage {name} has not finished (or its files changed): "
                                  f"run without --from first")
            failures += rec.get("failures") or []
            emit_stage(ctx, "skip", reason="before --from")
            continue
        key, inputs = _key(ctx, name)
        forced = start is not None and STAGES.index(name) >= STAGES.index(start)
        if not forced and rec.get("status") == "done" and rec.get("key") == key and not rec.get("failures") \
                and _intact(rec, ctx.layout):
            emit_stage(ctx, "skip", reason="unchanged", summary=rec.get("summary"))
            _publish(record, name, rec)
        else:
            if forced or rec.get("key") != key:
                remove(*stage.clean(ctx), *(o for o in stage.outputs(ctx)))
            record.stages[name] = rec = {"status": "running", "key": key, "inputs": inputs,
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            record.save()
            emit_stage(ctx, "run")
            t0 = time.perf_counter()
            outcome: Outcome = stage.run(ctx)
            rec.update(status="done", summary=outcome.summary, failures=outcome.failures,
                       outputs={n: digest(p) for n, p in ctx.layout.names(stage.outputs(ctx)).items()},
                       seconds=round(time.perf_counter() - t0, 2), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            _publish(record, name, rec)
            record.save()
            emit_stage(ctx, "done", summary=outcome.summary, failures=outcome.failures)
        failures += rec.get("failures") or []
        if name == until:
            break
    return failures


def _publish(record: RunRecord, name: str, rec: dict) -> None:
    """What the run reports at its top level: the eval figures, the outputs people look for."""
    if name == "eval":
        record.data["eval"] = rec.get("summary")


def emit_stage(ctx: Context, status: str, **data) -> None:
    ctx.on_event("stage", stage=ctx.stage, status=status, **data)


def _hardware() -> dict:
    from localforge.hardware import HardwareProfile

    return json.loads(HardwareProfile.detect().model_dump_json())
