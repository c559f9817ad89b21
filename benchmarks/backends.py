"""Server backends: localforge against the raw ``openai`` client, on one real llama.cpp server.

- requests/s and tokens/s at concurrency 1, 2, 4, 8, raw client (a thread pool) vs localforge
  (``chat`` on a batch), interleaved in one run (goal: ratio >= 0.97 at every level);
- call-cache hit latency against the uncached call;
- the JSON ladder's success rate and attempts per object on a fixed set of schemas.

    python benchmarks/backends.py [--requests 16] [--max-tokens 32] [--repeats 2]
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


class _Counting:
    """Counts the chat calls a backend makes that return (the ladder's attempts)."""

    def __init__(self, backend):
        self.calls, inner = 0, backend.chat

        def chat(*a, **kw):
            out = inner(*a, **kw)
            self.calls += 1
            return out

        backend.chat = chat


def main() -> None:
    from localforge.models import resolve
    from tests.servers import ALIAS, LlamaServer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json-rounds", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/backends.json")
    args = ap.parse_args()

    server = LlamaServer(resolve("smollm2-135m").gguf_path).start()
    try:
        print("throughput ...", file=sys.stderr, flush=True)
        rows = throughput(server.url, ALIAS, args)
        print("cache ...", file=sys.stderr, flush=True)
        cache = cache_latency(server.url, ALIAS)
        print("json ladder ...", file=sys.stderr, flush=True)
        ladder = json_ladder(server.url, ALIAS, args.json_rounds)
    finally:
        server.stop()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"llama.cpp server, SmolLM2-135M, {args.requests} requests x {args.max_tokens} tokens")
    for col in ("concurrency", "raw req/s", "localforge req/s", "raw tok/s", "localforge tok/s", "ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["concurrency"]), f"{r['raw_requests_per_s']:.2f}", f"{r['localforge_requests_per_s']:.2f}",
                      f"{r['raw_tokens_per_s']:.1f}", f"{r['localforge_tokens_per_s']:.1f}", f"{r['ratio']:.3f}")
    console.print(table)
    console.print(f"call cache: hit {cache['cache_hit_median_ms']} ms (median of 200) vs uncached call "
                  f"{cache['uncached_call_ms']} ms")
    lt = Table(title="JSON ladder (openai backend on llama.cpp server)")
    for col in ("schema", "success rate", "attempts per object"):
        lt.add_column(col)
    for name, v in ladder["schemas"].items():
        lt.add_row(name, f"{v['success_rate']:.2f}", f"{v['mean_attempts']:.2f}")
    console.print(lt)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "throughput": rows, "cache": cache, "json_ladder": ladder}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
