"""Helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

MODEL = "smollm2-135m"
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
