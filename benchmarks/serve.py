"""`localforge serve` against the anchors, under the same load (the real ``openai`` client, a thread
pool at a fixed concurrency, the bundled SmolLM2-135M, greedy, fixed max_tokens):

- ``localforge serve --backend llamacpp`` against ``python -m llama_cpp.server`` on the same GGUF,
  same threads and context (goal: requests/s and tokens/s at least 0.95 of it);
- ``localforge serve --backend torch`` (and mlx where it loads) against the engine called directly,
  one request after another (``Backend.chat``), which is what the server runs per request.

Rounds interleave (anchor, served, anchor, served, ...) and the median round counts: short rounds,
many of them, because a shared machine's load comes and goes (the 1-minute load average is
recorded beside each round).

    python benchmarks/serve.py [--requests 12] [--max-tokens 24] [--concurrency 4] [--repeats 6]
                               [--engine-requests 6] [--engines llamacpp,torch,mlx] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.servers

ALIAS = "smollm2-135m"
TOPICS = ["rivers", "bread", "owls", "copper", "tides", "chess", "glass", "bees",
          "volcanoes", "maps", "tea", "comets", "violins", "deserts", "salt", "kites"]


def convs(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)]


def start(cmd: list[str], health: str) -> subprocess.Popen:
    from tests.servers import wait_until_up

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    wait_until_up(health, timeout=180, proc=proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def http_round(url: str, batch, max_tokens: int, concurrency: int) -> tuple[float, int]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=600)

    def one(conv):
        out = client.chat.completions.create(model=ALIAS, messages=conv, max_tokens=max_tokens, temperature=0)
        return out.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        tokens = sum(pool.map(one, batch))
    seconds = time.perf_counter() - t0
    client.close()
    return seconds, tokens


def direct_round(backend, batch, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = sum(backend.chat(conv, max_tokens=max_tokens).completion_tokens for conv in batch)
    return time.perf_counter() - t0, tokens


def load() -> float:
    return round(os.getloadavg()[0], 2)


def row(label: str, anchor: list[tuple[float, int]], ours: list[tuple[float, int]], n: int) -> dict:
    a_s, o_s = statistics.median(t for t, _ in anchor), statistics.median(t for t, _ in ours)
    a_tok, o_tok = anchor[0][1], ours[0][1]
    return {"pair": label, "requests": n,
            "anchor_requests_per_s": round(n / a_s, 3), "serve_requests_per_s": round(n / o_s, 3),
            "anchor_tokens_per_s": round(a_tok / a_s, 1), "serve_tokens_per_s": round(o_tok / o_s, 1),
            "anchor_completion_tokens": a_tok, "serve_completion_tokens": o_tok,
            "ratio_requests": round(a_s / o_s, 3),
            "ratio_tokens": round((o_tok / o_s) / (a_tok / a_s), 3) if a_tok else None}


def serve_cmd(engine: str, port: int, parallel_queue: int) -> list[str]:
    return [sys.executable, "-m", "localforge", "serve", "--backend", engine, "--model", ALIAS,
            "--port", str(port), "--queue", str(parallel_queue)]


def llamacpp_pair(args) -> dict:
    from localforge.hardware import default_threads
    from localforge.models import resolve
    from tests.servers import free_port

    gguf = resolve(ALIAS).gguf_path
    threads = default_threads()  # what localforge's llamacpp backend runs with ($LOCALFORGE_THREADS, --threads)
    lp, sp = free_port(), free_port()
    anchor = start([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", ALIAS,
                    "--host", "127.0.0.1", "--port", str(lp), "--n_ctx", "4096", "--n_threads", str(threads),
                    "--n_threads_batch", str(threads), "--verbose", "False"], f"http://127.0.0.1:{lp}/v1/models")
    ours = start(serve_cmd("llamacpp", sp, args.concurrency * 2), f"http://127.0.0.1:{sp}/health")
    batch = convs(args.requests)
    a_rounds, o_rounds, loads = [], [], []
    try:
        for url in (f"http://127.0.0.1:{lp}/v1", f"http://127.0.0.1:{sp}/v1"):  # warm both
            http_round(url, batch[:2], args.max_tokens, 1)
        for _ in range(args.repeats):
            a_rounds.append(http_round(f"http://127.0.0.1:{lp}/v1", batch, args.max_tokens, args.concurrency))
            o_rounds.append(http_round(f"http://127.0.0.1:{sp}/v1", batch, args.max_tokens, args.concurrency))
            loads.append(load())
            print(f"  llamacpp round: anchor {a_rounds[-1][0]:.1f} s, serve {o_rounds[-1][0]:.1f} s, load {loads[-1]}",
                  file=sys.stderr, flush=True)
    finally:
        stop(ours)
        stop(anchor)
    return {**row("serve --backend llamacpp vs python -m llama_cpp.server", a_rounds, o_rounds, len(batch)),
            "threads": threads, "rounds": {"anchor_s": [round(t, 2) for t, _ in a_rounds],
                                           "serve_s": [round(t, 2) for t, _ in o_rounds], "load_1min": loads}}


def engine_pair(engine: str, args) -> dict:
    from localforge.backends import get_backend
    from tests.servers import free_port

    batch = convs(args.engine_requests)
    try:
        backend = get_backend(engine, ALIAS)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return {"pair": f"serve --backend {engine} vs the engine directly", "error": f"{type(exc).__name__}: {exc}"}
    a_rounds, o_rounds, loads = [], [], []
    sp, ours = free_port(), None
    try:  # both loaded; the server idles while the engine runs directly, and the other way round
        ours = start(serve_cmd(engine, sp, args.concurrency * 2), f"http://127.0.0.1:{sp}/health")
        direct_round(backend, batch[:2], args.max_tokens)
        http_round(f"http://127.0.0.1:{sp}/v1", batch[:2], args.max_tokens, 1)
        for _ in range(args.repeats):
            a_rounds.append(direct_round(backend, batch, args.max_tokens))
            o_rounds.append(http_round(f"http://127.0.0.1:{sp}/v1", batch, args.max_tokens, args.concurrency))
            loads.append(load())
            print(f"  {engine} round: direct {a_rounds[-1][0]:.1f} s, serve {o_rounds[-1][0]:.1f} s, load {loads[-1]}",
                  file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return {"pair": f"serve --backend {engine} vs the engine directly", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if ours is not None:
            stop(ours)
        backend.close()
    return {**row(f"serve --backend {engine} vs {engine} Backend.chat directly", a_rounds, o_rounds, len(batch)),
            "rounds": {"anchor_s": [round(t, 2) for t, _ in a_rounds], "serve_s": [round(t, 2) for t, _ in o_rounds],
                       "load_1min": loads}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=12, help="requests per round, llama.cpp pair")
    ap.add_argument("--engine-requests", type=int, default=6, help="requests per round, torch and mlx pairs")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--engines", default="llamacpp,torch,mlx")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for every engine and the anchor (sets $LOCALFORGE_THREADS; default: the cores)")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    import platform

    if args.threads:
        os.environ["LOCALFORGE_THREADS"] = str(args.threads)

    results: dict = {"settings": vars(args), "machine": f"{platform.system()} {platform.machine()}, "
                     f"{os.cpu_count()} CPU cores", "pairs": []}
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        print(f"{engine} ...", file=sys.stderr, flush=True)
        results["pairs"].append(llamacpp_pair(args) if engine == "llamacpp" else engine_pair(engine, args))
    report(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def report(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = results["settings"]
    table = Table(title=f"localforge serve, SmolLM2-135M, {results['machine']}: concurrency {s['concurrency']}, "
                        f"max_tokens {s['max_tokens']}, median of {s['repeats']} rounds")
    for col in ("pair", "requests", "anchor req/s", "serve req/s", "anchor tok/s", "serve tok/s", "ratio req/s",
                "ratio tok/s"):
        table.add_column(col)
    for r in results["pairs"]:
        if "error" in r:
            table.add_row(r["pair"], "-", "-", "-", "-", "-", "-", r["error"][:60])
            continue
        table.add_row(r["pair"], str(r["requests"]), f"{r['anchor_requests_per_s']:.2f}",
                      f"{r['serve_requests_per_s']:.2f}", f"{r['anchor_tokens_per_s']:.1f}",
                      f"{r['serve_tokens_per_s']:.1f}", f"{r['ratio_requests']:.3f}", f"{r['ratio_tokens']:.3f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
