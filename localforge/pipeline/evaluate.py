"""The eval stage: the student without and with what fine-tuning made (the adapter; for a full run,
the trained model), on the same engine, greedy, on

- the held-out pairs (``dataset/test.jsonl``): other questions about the same documents. An answer
  is scored by the grounded values its pair rests on (``provenance.sources``): the share of them it
  states (``value_recall``, numbers in any written form) and whether it states all (``exact``).
  A pair that names no value (free text) is judged by the teacher against its reference answer
  when ``eval.judge`` is on, and left unscored otherwise;
- a general sample (``eval.general``: questions with accepted answers), to catch forgetting: the
  share answered right without and with.

Answers are written to ``eval/answers.jsonl`` as they come (resumable: a re-run asks only what is
missing); the figures go to ``eval/eval.json`` and the run's manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localforge.errors import ConfigError
from localforge.files import write_atomic
from localforge.pipeline.layout import read_rows

if TYPE_CHECKING:
    from localforge.pipeline.stages import Context

VARIANTS = ("base", "tuned")
BATCH = 8  # questions per generate call


def heldout_items(test: Path) -> list[dict]:
    """The held-out rows as questions: the conversation up to the answer, the reference answer and
    the grounded values it must state."""
    items = []
    for n, row in enumerate(read_rows(test), 1):
        meta = row.get("metadata") or {}
        if "messages" in row:
            conversation, reference = row["messages"][:-1], row["messages"][-1]["content"]
        else:
            conversation, reference = [{"role": "user", "content": row["prompt"]}], row["completion"]
        values = [s["value"] for s in (meta.get("provenance") or {}).get("sources") or [] if "value" in s]
        items.append({"split": "heldout", "n": n, "id": meta.get("id"), "conversation": conversation,
                      "reference": reference, "values": values})
    return items


def general_items(path: str | None, limit: int | None) -> list[dict]:
    if path is None:
        return []
    items = []
    for n, row in enumerate(read_rows(Path(path)), 1):
        answer = row.get("answer")
        accepted = [answer] if isinstance(answer, str | int | float) else answer
        if not isinstance(row.get("question"), str) or not accepted or not isinstance(accepted, list):
            raise ConfigError(f"eval.general {path} line {n}: give \"question\" (a string) and \"answer\" "
                              f"(a string or a list of accepted answers)")
        items.append({"split": "general", "n": n, "conversation": [{"role": "user", "content": row["question"]}],
                      "reference": str(accepted[0]), "accepted": [str(a) for a in accepted]})
    return items[:limit] if limit else items


def score(item: dict, answer: str, judge=None) -> dict:
    """What one answer earns: for a held-out pair, the values it states; for a general question,
    whether it states an accepted answer; for free text, the teacher's verdict (or nothing)."""
    from localforge.extract.grounding import mentions

    if item["split"] == "general":
        return {"correct": any(mentions(answer, a) for a in item["accepted"])}
    if item["values"]:
        found = sum(bool(mentions(answer, v)) for v in item["values"])
        return {"found": found, "values": len(item["values"]), "exact": found == len(item["values"])}
    if judge is None:
        return {"scored": False}
    question = item["conversation"][-1]["content"]
    return {"exact": bool(judge(question, answer, item["reference"])), "judged": True}


def _judge(ctx: Context):
    """The teacher's yes/no on a free-text answer (teach eval's judge), or None when it is off."""
    from localforge.backends import GenerationParams, generate_json, get_backend
    from localforge.teach.evaluate import JUDGE_SCHEMA, judge_conversation

    teacher = ctx.settings.generate.teacher
    state: dict[str, Any] = {}

    def judge(question: str, answer: str, reference: str) -> bool:
        if "backend" not in state:
            state["backend"] = get_backend(teacher.backend, teacher.model, cache=True, **teacher.backend_options())
        got = generate_json(state["backend"], judge_conversation(question, answer, reference), JUDGE_SCHEMA,
                            GenerationParams(max_tokens=32, temperature=0.0, seed=0))
        return bool(got["correct"])

    def close() -> None:
        if "backend" in state:
            state["backend"].close()

    return judge, close


def figures(rows: list[dict]) -> dict:
    """The report: per variant, the held-out value recall and exact share and the general accuracy;
    the gain (tuned - base) and the forgetting (base - tuned on the general sample)."""
    def share(k: float, n: int) -> float | None:
        return round(k / n, 6) if n else None

    out: dict[str, Any] = {}
    for variant in VARIANTS:
        held = [r for r in rows if r["variant"] == variant and r["split"] == "heldout"]
        valued = [r for r in held if "values" in r["score"]]
        scored = [r for r in held if "exact" in r["score"]]
        general = [r for r in rows if r["variant"] == variant and r["split"] == "general"]
        out[variant] = {
            "heldout": len(held),
            "value_recall": share(sum(r["score"]["found"] for r in valued), sum(r["score"]["values"] for r in valued)),
            "exact": share(sum(r["score"]["exact"] for r in scored), len(scored)),
            "unscored": len(held) - len(scored),
            "general": len(general),
            "general_accuracy": share(sum(r["score"]["correct"] for r in general), len(general)),
        }

    def diff(key: str, a: str, b: str) -> float | None:
        x, y = out[a][key], out[b][key]
        return round(x - y, 6) if x is not None and y is not None else None

    out["gain_value_recall"] = diff("value_recall", "tuned", "base")
    out["gain_exact"] = diff("exact", "tuned", "base")
    out["forgetting"] = diff("general_accuracy", "base", "tuned")
    return out


def evaluate(ctx: Context) -> dict:
    from localforge.backends import GenerationParams, get_backend
    from localforge.pipeline.stages import finetune_output
    from localforge.resumable import ResumableOutput

    L, s = ctx.layout, ctx.settings.eval
    run_config = _yaml(L.run / "config.yaml")
    backend, model = run_config.get("backend", ctx.settings.finetune.backend), run_config.get("model", ctx.settings.finetune.model)
    trained = finetune_output(L.run)
    items = heldout_items(L.split("test")) + general_items(s.general, s.general_limit)
    if not items:
        raise ConfigError("eval: nothing to ask: dataset.holdout is 0 and eval.general is null; "
                          "hold out some pairs or give a general sample")
    key = lambda variant, item: f"{variant}/{item['split']}/{item['n']}"  # noqa: E731
    params = GenerationParams(max_tokens=s.max_tokens, temperature=0.0, seed=0)
    judge, close_judge = _judge(ctx) if s.judge else (None, lambda: None)
    L.eval.mkdir(parents=True, exist_ok=True)
    ctx.progress(total=len(items) * len(VARIANTS))
    try:
        with ResumableOutput(L.answers, done_key=lambda r: r.get("item"), row_key=lambda r: r.get("item"),
                             job="the eval stage") as out:
            for variant in VARIANTS:
                todo = [it for it in items if key(variant, it) not in out.done]
                ctx.progress(advance=len(items) - len(todo))
                if not todo:
                    continue
                if variant == "base" or trained.name == "adapter":
                    options = {"adapter": str(trained)} if variant == "tuned" else {}
                    llm = get_backend(backend, model, **options)
                else:  # a full run: the trained model folder itself
                    llm = get_backend(backend, str(trained))
                try:
                    for i in range(0, len(todo), BATCH):
                        chunk = todo[i:i + BATCH]
                        results = llm.chat([it["conversation"] for it in chunk], params)
                        for it, result in zip(chunk, results if isinstance(results, list) else [results], strict=True):
                            answer = result.text.strip()
                            out.write(out.out, {"item": key(variant, it), "variant": variant, "split": it["split"],
                                                "n": it["n"], "id": it.get("id"), "question": it["conversation"][-1]["content"],
                                                "answer": answer, "reference": it["reference"],
                                                "score": score(it, answer, judge)})
                            out.finish({"item": key(variant, it)})
                            ctx.progress(advance=1)
                            ctx.point()
                finally:
                    llm.close()
    finally:
        close_judge()
    rows = read_rows(L.answers)
    report = {"backend": backend, "model": model, "trained": str(trained), **figures(rows),
              "answers": str(L.answers)}
    write_atomic(L.report, json.dumps(report, indent=2) + "\n")
    return report


def _yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
