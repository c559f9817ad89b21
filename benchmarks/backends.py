"""Server backends: localforge against the raw ``openai`` client, on one real llama.cpp server.

- requests/s and tokens/s at concurrency 1, 2, 4, 8, raw client (a thread pool) vs localforge
  (``chat`` on a batch), interleaved in one run (goal: ratio >= 0.97 at every level);
- call-cache hit latency against the uncached call;
- the JSON ladder's success rate and attempts per object on a fixed set of schemas;
- schemas with integer and number ranges (5 schemas x 20 seeded samples at temperature 0.7)
  through the llama.cpp server and in-process llama.cpp, with the grammar rung and without it
  (goal: >= 99% valid within 3 attempts with it);
- JSON repair on a corpus of broken answers: the hand-written repair alone, ``json_repair`` on
  the whole answer, and what ``extract_json`` does (hand-written, then json_repair on a complete
  span): recovered exactly, wrong value returned, or refused.

    python benchmarks/backends.py [--requests 16] [--max-tokens 32] [--repeats 2]
    python benchmarks/backends.py --sections ranges,repair --range-samples 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.servers

TOPICS = ["rivers", "bread", "owls", "copper", "tides", "chess", "glass", "bees",
          "volcanoes", "maps", "tea", "comets", "violins", "deserts", "salt", "kites"]

SCHEMAS = {
    "city": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                "age": {"type": "integer", "minimum": 18, "maximum": 99}},
               "required": ["name", "age"]},
    "colour": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    "tags": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
             "required": ["tags"]},
    "score": {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5},
                                               "reason": {"type": "string"}}, "required": ["score", "reason"]},
}
JSON_PROMPTS = {
    "city": "What is the capital of Italy?",
    "person": "Invent a character for a short story.",
    "colour": "What colour is a clear sky?",
    "tags": "Give three keywords about the ocean.",
    "score": "Rate the sentence 'The cat sat on the mat.' for clarity.",
}


# Schemas with ranges, none of them used in the tests.
RANGE_SCHEMAS = {
    "person": {"type": "object", "required": ["name", "age"], "properties": {
        "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 18, "maximum": 99}}},
    "review": {"type": "object", "required": ["stars", "summary"], "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "summary": {"type": "string", "maxLength": 80}}},
    "weather": {"type": "object", "required": ["celsius", "humidity"], "properties": {
        "celsius": {"type": "number", "minimum": -40, "maximum": 55},
        "humidity": {"type": "integer", "minimum": 0, "maximum": 100}}},
    "product": {"type": "object", "required": ["sku", "price", "quantity"], "properties": {
        "sku": {"type": "string", "minLength": 4, "maxLength": 8},
        "price": {"type": "number", "minimum": 0.5, "maximum": 999.99},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 12}}},
    "event": {"type": "object", "required": ["year", "month", "day", "confidence"], "properties": {
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "month": {"type": "integer", "minimum": 1, "maximum": 12},
        "day": {"type": "integer", "minimum": 1, "maximum": 31},
        "confidence": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}}},
}
RANGE_PROMPTS = {
    "person": "Invent a character for a short story.",
    "review": "Review a restaurant you have never been to.",
    "weather": "Describe the weather in Oslo in January.",
    "product": "List one item from a hardware shop.",
    "event": "When did the first moon landing happen, and how sure are you?",
}


def convs(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)]


def raw_round(client, model: str, batch, max_tokens: int, concurrency: int) -> tuple[float, int]:
    def one(conv):
        out = client.chat.completions.create(model=model, messages=conv, max_tokens=max_tokens, temperature=0)
        return out.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        tokens = sum(pool.map(one, batch))
    return time.perf_counter() - t0, tokens


def ours_round(backend, batch, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = backend.chat(batch, max_tokens=max_tokens)
    return time.perf_counter() - t0, sum(r.completion_tokens for r in results)


def throughput(url: str, model: str, args) -> list[dict]:
    import openai

    from localforge.backends import get_backend

    client = openai.OpenAI(base_url=url, api_key="not-needed", max_retries=0)
    batch = convs(args.requests)
    rows = []
    for c in (1, 2, 4, 8):
        be = get_backend("openai", model, base_url=url, concurrency=c)
        raw_t, ours_t = [], []
        for _ in range(args.repeats):
            t, raw_tok = raw_round(client, model, batch, args.max_tokens, c)
            raw_t.append(t)
            t, our_tok = ours_round(be, batch, args.max_tokens)
            ours_t.append(t)
        raw_s, our_s = statistics.median(raw_t), statistics.median(ours_t)
        rows.append({
            "concurrency": c,
            "raw_requests_per_s": round(len(batch) / raw_s, 3),
            "localforge_requests_per_s": round(len(batch) / our_s, 3),
            "raw_tokens_per_s": round(raw_tok / raw_s, 1),
            "localforge_tokens_per_s": round(our_tok / our_s, 1),
            "ratio": round(raw_s / our_s, 3),
        })
        be.close()
        print(f"  concurrency {c}: ratio {rows[-1]['ratio']}", file=sys.stderr, flush=True)
    return rows


def cache_latency(url: str, model: str) -> dict:
    from localforge.backends import get_backend

    with tempfile.TemporaryDirectory() as tmp:
        be = get_backend("openai", model, base_url=url, cache=Path(tmp) / "calls.sqlite")
        conv = [{"role": "user", "content": "Name a colour."}]
        t0 = time.perf_counter()
        be.chat(conv, max_tokens=16)
        miss = time.perf_counter() - t0
        hits = []
        for _ in range(200):
            t0 = time.perf_counter()
            assert be.chat(conv, max_tokens=16).cached
            hits.append(time.perf_counter() - t0)
        be.close()
    return {"uncached_call_ms": round(miss * 1000, 1), "cache_hit_median_ms": round(statistics.median(hits) * 1000, 3)}


def json_ladder(url: str, model: str, rounds: int) -> dict:
    from localforge.backends import (
        GenerationParams,
        StructuredOutputError,
        generate_json,
        get_backend,
    )

    per_schema = {}
    for name, schema in SCHEMAS.items():
        ok, attempts = 0, []
        for i in range(rounds):
            be = get_backend("openai", model, base_url=url)
            conv = [{"role": "user", "content": JSON_PROMPTS[name]}]
            tracked = _Counting(be)
            try:
                # temperature > 0 with a seed: each round is a different but repeatable sample
                generate_json(be, conv, schema, GenerationParams(max_tokens=128, temperature=0.7, seed=i), attempts=3)
                ok += 1
            except StructuredOutputError:
                pass
            attempts.append(tracked.calls)
        per_schema[name] = {"success_rate": round(ok / rounds, 3), "mean_attempts": round(statistics.mean(attempts), 2)}
    total_ok = statistics.mean(v["success_rate"] for v in per_schema.values())
    return {"rounds_per_schema": rounds, "overall_success_rate": round(total_ok, 3), "schemas": per_schema}


def json_ranges(make_backend, samples: int, grammar: bool) -> dict:
    """``samples`` seeded generate_json calls per schema at temperature 0.7, 3 attempts each."""
    from localforge.backends import (
        GenerationParams,
        StructuredOutputError,
        forget_probes,
        generate_json,
    )
    from localforge.backends.structured import PROBES

    per_schema, t0 = {}, time.perf_counter()
    be = make_backend()
    forget_probes(be)
    if not grammar:
        PROBES.reject(be.identity(), "grammar")
    tracked = _Counting(be)
    for name, schema in RANGE_SCHEMAS.items():
        ok = first = 0
        attempts, failures = [], []
        for seed in range(samples):
            before = tracked.calls
            try:
                generate_json(be, [{"role": "user", "content": RANGE_PROMPTS[name]}], schema,
                              GenerationParams(max_tokens=160, temperature=0.7, seed=seed), attempts=3)
                ok += 1
                first += tracked.calls - before == 1
            except StructuredOutputError as exc:
                failures.append(exc.attempts[-1].error[:120])
            attempts.append(tracked.calls - before)
        per_schema[name] = {"valid": ok, "samples": samples, "first_try": first,
                            "mean_attempts": round(statistics.mean(attempts), 2), "failures": failures}
    modes = sorted({m for m in tracked.modes})
    forget_probes(be)
    be.close()
    total = sum(v["valid"] for v in per_schema.values())
    n = samples * len(RANGE_SCHEMAS)
    return {"valid": total, "calls": n, "valid_rate": round(total / n, 4),
            "first_try_rate": round(sum(v["first_try"] for v in per_schema.values()) / n, 4),
            "modes": modes, "seconds": round(time.perf_counter() - t0, 1), "schemas": per_schema}


REPAIR_CASES = [
    # (broken answer, the value meant; None: nothing should be returned)
    ('{"a": 1, "b": [1, 2,],}', {"a": 1, "b": [1, 2]}),
    ('{"ok": True, "none": None}', {"ok": True, "none": None}),
    ("{'name': 'Ann', 'age': 31}", {"name": "Ann", "age": 31}),
    ('{name: "Ann", age: 31}', {"name": "Ann", "age": 31}),
    ('{"name": "Ann" "age": 31}', {"name": "Ann", "age": 31}),
    ('{"name": "Ann", // the name\n "age": 31}', {"name": "Ann", "age": 31}),
    ('{"name": "Ann", /* c */ "age": 31}', {"name": "Ann", "age": 31}),
    ('{"quote": "She said "hi" twice"}', {"quote": 'She said "hi" twice'}),
    ('{"text": "line one\nline two"}', {"text": "line one\nline two"}),
    ('Sure! Here it is:\n```json\n{"city": "Rome",}\n```', {"city": "Rome"}),
    ('Answer: {"n": 5} Hope this helps.', {"n": 5}),
    ('{"name": "Bob", "age": 2', None),  # cut off: "age" might have been 25
    ('{"tags": ["a", "b"', None),
    ('{"name": "Bo', None),
    ("The answer is five.", None),
    ("I cannot help with that.", None),
    ('{"x": NaN}', None),
]


def json_repair_table() -> dict:
    import json_repair

    from localforge.backends import structured
    from localforge.backends.structured import JSONExtractionError, extract_json

    def hand_only(text):
        saved = structured._library_repair
        structured._library_repair = lambda span: None
        try:
            return extract_json(text)
        finally:
            structured._library_repair = saved

    def library_whole(text):
        value = json_repair.loads(text)
        if value in ("", None, [], {}):
            raise JSONExtractionError("nothing")
        return value

    rows = {}
    for label, fn in (("hand-written only", hand_only), ("json_repair on the whole answer", library_whole),
                      ("extract_json (hand, then json_repair on a complete span)", extract_json)):
        right = wrong = refused = 0
        for text, meant in REPAIR_CASES:
            try:
                got = fn(text)
            except (JSONExtractionError, ValueError):
                refused += meant is None
                continue
            if meant is not None and got == meant:
                right += 1
            else:
                wrong += 1
        rows[label] = {"recovered": right, "wrong_value": wrong, "refused_rightly": refused,
                       "cases": len(REPAIR_CASES), "should_recover": sum(m is not None for _, m in REPAIR_CASES)}
    return rows


class _Counting:
    """Counts the chat calls a backend makes that return (the ladder's attempts)."""

    def __init__(self, backend):
        self.calls, inner, self.modes = 0, backend.chat, []

        def chat(conv, params=None, **kw):
            out = inner(conv, params, **kw)
            self.calls += 1
            if params is not None:
                self.modes.append("grammar" if params.grammar else "json" if params.json_object
                                  else "schema" if params.json_schema else "prompt")
            return out

        backend.chat = chat


SECTIONS = ("throughput", "cache", "ladder", "ranges", "repair")


def main() -> None:
    from localforge.models import resolve
    from tests.servers import ALIAS, LlamaServer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json-rounds", type=int, default=4)
    ap.add_argument("--range-samples", type=int, default=20, help="seeded samples per schema with ranges")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--out", default="benchmarks/results/backends.json")
    args = ap.parse_args()
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    if unknown := set(sections) - set(SECTIONS):
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))}")

    results: dict = {"settings": vars(args)}
    gguf = resolve("smollm2-135m").gguf_path
    server = LlamaServer(gguf).start() if set(sections) & {"throughput", "cache", "ladder", "ranges"} else None
    try:
        if "throughput" in sections:
            print("throughput ...", file=sys.stderr, flush=True)
            results["throughput"] = throughput(server.url, ALIAS, args)
        if "cache" in sections:
            print("cache ...", file=sys.stderr, flush=True)
            results["cache"] = cache_latency(server.url, ALIAS)
        if "ladder" in sections:
            print("json ladder ...", file=sys.stderr, flush=True)
            results["json_ladder"] = json_ladder(server.url, ALIAS, args.json_rounds)
        if "ranges" in sections:
            from localforge.backends import get_backend

            makers = {
                "llama.cpp server (openai backend)": lambda: get_backend("openai", ALIAS, base_url=server.url),
                "llama.cpp in-process": lambda: get_backend("llamacpp", ALIAS),
            }
            results["json_ranges"] = {}
            for label, make in makers.items():
                for grammar in (True, False):
                    key = f"{label}, {'grammar rung' if grammar else 'no grammar rung'}"
                    print(f"ranges: {key} ...", file=sys.stderr, flush=True)
                    results["json_ranges"][key] = json_ranges(make, args.range_samples, grammar)
    finally:
        if server:
            server.stop()
    if "repair" in sections:
        results["json_repair"] = json_repair_table()
    report(results)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def report(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    args = results["settings"]
    if rows := results.get("throughput"):
        table = Table(title=f"llama.cpp server, SmolLM2-135M, {args['requests']} requests x {args['max_tokens']} tokens")
        for col in ("concurrency", "raw req/s", "localforge req/s", "raw tok/s", "localforge tok/s", "ratio"):
            table.add_column(col)
        for r in rows:
            table.add_row(str(r["concurrency"]), f"{r['raw_requests_per_s']:.2f}", f"{r['localforge_requests_per_s']:.2f}",
                          f"{r['raw_tokens_per_s']:.1f}", f"{r['localforge_tokens_per_s']:.1f}", f"{r['ratio']:.3f}")
        console.print(table)
    if cache := results.get("cache"):
        console.print(f"call cache: hit {cache['cache_hit_median_ms']} ms (median of 200) vs uncached call "
                      f"{cache['uncached_call_ms']} ms")
    if ladder := results.get("json_ladder"):
        lt = Table(title="JSON ladder (openai backend on llama.cpp server)")
        for col in ("schema", "success rate", "attempts per object"):
            lt.add_column(col)
        for name, v in ladder["schemas"].items():
            lt.add_row(name, f"{v['success_rate']:.2f}", f"{v['mean_attempts']:.2f}")
        console.print(lt)
    if ranges := results.get("json_ranges"):
        rt = Table(title=f"Schemas with ranges: {args['range_samples']} seeded samples per schema, temperature 0.7, "
                         "valid within 3 attempts (goal >= 99%)")
        for col in ("engine", *RANGE_SCHEMAS, "valid", "first try", "modes", "s"):
            rt.add_column(col)
        for key, v in ranges.items():
            rt.add_row(key, *(f"{s['valid']}/{s['samples']}" for s in v["schemas"].values()),
                       f"{v['valid_rate']:.1%}", f"{v['first_try_rate']:.1%}", ",".join(v["modes"]), f"{v['seconds']}")
        console.print(rt)
    if repair := results.get("json_repair"):
        jt = Table(title="JSON repair on broken answers")
        for col in ("method", "recovered", "wrong value returned", "refused rightly"):
            jt.add_column(col)
        for label, v in repair.items():
            jt.add_row(label, f"{v['recovered']}/{v['should_recover']}", str(v["wrong_value"]),
                       f"{v['refused_rightly']}/{v['cases'] - v['should_recover']}")
        console.print(jt)


if __name__ == "__main__":
    main()
