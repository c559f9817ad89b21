"""`localforge generate`: one prompt, one answer (or a JSON value that validates against a schema)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common
from localforge.commands.common import out


def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    backend: common.Backend = None,
    model: common.Model = None,
    base_url: common.BaseUrl = None,
    api_key_env: common.ApiKeyEnv = None,
    timeout: common.Timeout = None,
    concurrency: common.Concurrency = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")] = None,
    json_schema: Annotated[Path | None, typer.Option("--json-schema", help="A JSON Schema file: print a JSON object that validates.")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse answers from the call cache.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print usage and timing to stderr.")] = False,
    adapter: Annotated[Path | None, typer.Option("--adapter", help="A LoRA adapter folder (mlx-lm or PEFT) to load on the model.")] = None,
) -> None:
    """Answer one prompt with a local model (or a server) and print the answer."""

    from localforge.backends import GenerationParams, generate_json, get_backend
    from localforge.jsonfiles import check_json_schema, read_json
    from localforge.models import DEFAULT_MODEL

    schema = None
    if json_schema:
        schema = check_json_schema(read_json(json_schema, "--json-schema"), f"--json-schema {json_schema}")
    params = GenerationParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop or ())
    )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    backend, model = backend or "auto", model or DEFAULT_MODEL
    # A spinner on a terminal while the model loads (the first use of a GGUF on torch or mlx
    # converts it once, about 20 s for SmolLM2-135M); nothing when stderr is not a terminal.
    with common.console(stderr=True).status(f"loading {model} ({backend}) ...", spinner="dots"):
        be = get_backend(backend, model, cache=cache or None, base_url=base_url, api_key_env=api_key_env,
                         timeout=timeout, concurrency=concurrency, **({"adapter": str(adapter)} if adapter else {}))
    common.engine_note(backend)  # once the model loaded: a bad input stays one line
    with be:
        if schema is not None:
            out(json.dumps(generate_json(be, messages, schema, params), ensure_ascii=False))
            return
        result = be.chat(messages, params)
    out(result.text.strip())
    if verbose:
        tps = result.completion_tokens / result.latency_s if result.latency_s else 0.0
        sys.stderr.write(
            f"[{result.backend} {result.model}] prompt={result.prompt_tokens} "
            f"completion={result.completion_tokens} finish={result.finish_reason} "
            f"{result.latency_s:.2f}s {tps:.1f} tok/s{' (cached)' if result.cached else ''}\n"
        )
