"""Helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = "smollm2-135m"

# Real documents from the docling project, used in place from shared/ beside the checkout (as CI
# and every session here have it; it is not part of the repository).
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "docling"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the shared corpus is not at {CORPUS}")
# The question. On llama.cpp (Q4_1 weights, 8-bit activations) its greedy first token is a
# near-tie ("The" 0.152 vs "L" 0.140 in fp32) that flips to "L'Étoile..."; asking for one sentence
# gives every backend a clear answer.
QUESTION = "What is the capital of France?"
ONE_SENTENCE = "What is the capital of France? Answer in one sentence."
MESSAGES = [{"role": "user", "content": ONE_SENTENCE}]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `localforge ARGS` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "localforge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
