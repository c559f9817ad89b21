"""Fuzzy grounding: rapidfuzz's partial_ratio_alignment (what grounding.py uses) against the
difflib SequenceMatcher scan it replaced, on values cut from the docling corpus.

For each corpus document: phrases of 2 to 8 words cut at random from the converted text, each
with one or two character edits (a swap, a dropped or a changed letter), looked up in a window of
2,000 characters around them (a chunk) and in the whole document. Reported: share found at the
right place (the span found overlaps the true one by at least 80% of the longer), false hits on
phrases that are not in the text, and milliseconds per lookup.

    python benchmarks/grounding.py [--n 300] [--out benchmarks/results/grounding.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from difflib import SequenceMatcher
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "corpus" / "docling"
THRESHOLD = 0.85


def difflib_fuzzy(needle: str, text: str, lo: int, hi: int):
    """grounding._find_fuzzy as it was before rapidfuzz (commit 4c04fbb)."""
    want = needle.strip().lower()
    if len(want) < 4:
        return None
    hay = text[lo:hi].lower()
    n, best = len(want), (0.0, 0, 0)
    step = max(1, n // 4)
    for i in range(0, max(1, len(hay) - n + 1), step):
        window = hay[i : i + n + n // 4]
        sm = SequenceMatcher(None, want, window, autojunk=False)
        blocks = sm.get_matching_blocks()
        if not blocks or blocks[0].size == 0:
            continue
        first, last = blocks[0], [b for b in blocks if b.size][-1]
        start, end = i + first.b, i + last.b + last.size
        ratio = SequenceMatcher(None, want, hay[start:end], autojunk=False).ratio()
        if ratio > best[0]:
            best = (ratio, start, end)
    ratio, start, end = best
    return (lo + start, lo + end, ratio) if ratio >= THRESHOLD else None


def rapidfuzz_fuzzy(needle: str, text: str, lo: int, hi: int):
    from localforge.extract.grounding import _find_fuzzy

    return _find_fuzzy(needle, text, lo, hi)


def perturb(rng: random.Random, s: str) -> str:
    chars = list(s)
    for _ in range(rng.choice([1, 2])):
        i = rng.randrange(len(chars))
        if not chars[i].isalnum():
            continue
        op = rng.choice(["swap", "drop", "change"])
        if op == "swap" and i + 1 < len(chars):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif op == "drop":
            del chars[i]
        else:
            chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
    return "".join(chars)


def cases(n: int, seed: int = 0):
    from localforge.extract.convert import Converter

    rng = random.Random(seed)
    conv = Converter(pdf_mode="native")
    texts = []
    for p in sorted(CORPUS.rglob("*")):
        if p.suffix.lower() in (".md", ".html", ".pdf", ".docx") and p.stat().st_size < 2_000_000:
            try:
                t = conv.convert(p).text
            except Exception:  # noqa: BLE001 - a corpus file docling cannot read is not a case
                continue
            if len(t) > 3000:
                texts.append(t)
    out = []
    while len(out) < n:
        text = rng.choice(texts)
        words = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+", text)]
        k = rng.randint(2, 8)
        i = rng.randrange(len(words) - k)
        start, end = words[i][0], words[i + k - 1][1]
        phrase = text[start:end]
        if len(phrase) < 8 or len(phrase) > 80 or "|" in phrase:
            continue
        out.append((text, start, end, perturb(rng, phrase), "".join(rng.sample(phrase, len(phrase)))))
    return out


def measure(fn, items, whole: bool) -> dict:
    right = false_hits = 0
    times = []
    for text, start, end, noisy, shuffled in items:
        lo, hi = (0, len(text)) if whole else (max(0, start - 1000), min(len(text), end + 1000))
        t0 = time.perf_counter()
        hit = fn(noisy, text, lo, hi)
        times.append(time.perf_counter() - t0)
        if hit:
            overlap = max(0, min(hit[1], end) - max(hit[0], start))
            right += overlap >= 0.8 * max(hit[1] - hit[0], end - start)
        false_hits += fn(shuffled, text, lo, hi) is not None
    n = len(items)
    return {"found_right": round(right / n, 3), "false_hits": round(false_hits / n, 3),
            "ms_per_lookup_median": round(statistics.median(times) * 1000, 3),
            "ms_per_lookup_mean": round(statistics.mean(times) * 1000, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results/grounding.json")
    args = ap.parse_args()
    items = cases(args.n)
    results = {}
    for scope, whole in (("chunk (2,000 chars)", False), ("whole document", True)):
        subset = items if not whole else items[: max(20, args.n // 10)]  # difflib is slow on whole documents
        for name, fn in (("difflib", difflib_fuzzy), ("rapidfuzz", rapidfuzz_fuzzy)):
            results[f"{name} / {scope}"] = {"cases": len(subset), **measure(fn, subset, whole)}
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fuzzy grounding: {args.n} perturbed corpus phrases")
    for col in ("", "cases", "found at the right span", "false hits", "ms/lookup (median)", "ms/lookup (mean)"):
        table.add_column(col)
    for name, r in results.items():
        table.add_row(name, str(r["cases"]), f"{r['found_right']:.1%}", f"{r['false_hits']:.1%}",
                      f"{r['ms_per_lookup_median']:.2f}", f"{r['ms_per_lookup_mean']:.2f}")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
