"""What the adaptive-teaching tests share: the GSM8K rows, small budgets, one call cache for the
session (the eval and adaptive tests ask the same calls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "gsm8k" / "test.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM8K.is_file(), reason=f"the shared GSM8K corpus is not at {GSM8K}")

# small budgets: the whole file must run in well under 2 minutes on 2 cores
# (the scoring answer's assessment holds at most 120 characters: 144 tokens always fit it)
SMALL = {"probe_tokens": 16, "teaching_tokens": 32, "max_tokens": 48, "critique_tokens": 144}
SMALL_ARGS = ["--probe-tokens", "16", "--teaching-tokens", "32", "--answer-tokens", "48", "critique_tokens=144"]


def gsm8k(n: int) -> list[dict]:
    rows = []
    with open(GSM8K, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def cache_dir(tmp_path_factory) -> Path:
    """One cache folder for the session ($LOCALFORGE_CACHE for CLI runs; calls.sqlite in it)."""
    path = tmp_path_factory.getbasetemp() / "atlas-cache"
    path.mkdir(exist_ok=True)
    return path


def cached(backend, tmp_path_factory):
    """The session's in-process backend behind the session's call cache (closing it is not ours)."""
    from localforge.backends.cache import with_cache

    return with_cache(backend, cache_dir(tmp_path_factory) / "calls.sqlite")


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
