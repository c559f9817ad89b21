"""The `localforge` command: parse, call the library, render. Nothing else lives here.

Heavy modules are imported inside commands so `localforge --help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

app = typer.Typer(
    name="localforge",
    help="Build small, specialised LLMs on your own hardware: extract, teach, fine-tune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="List, inspect and prepare models (offline).", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


# --- doctor ---------------------------------------------------------------------------------


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show this machine's hardware and which backends can run on it."""
    from localforge.doctor import report

    data = report()
    if as_json:
        _out(json.dumps(data, indent=2))
        return
    from localforge.doctor import render

    render(data)


# --- generate -------------------------------------------------------------------------------


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    backend: Annotated[str, typer.Option("--backend", "-b", help="auto, torch, mlx, llamacpp, ...")] = "auto",
    model: Annotated[str, typer.Option("--model", "-m", help="Alias, HF folder, .gguf file or cached repo id.")] = "smollm2-135m",
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print usage and timing to stderr.")] = False,
) -> None:
    """Answer one prompt with a local model and print the answer."""
    from localforge.backends import GenerationParams, get_backend

    params = GenerationParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop or ())
    )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    from rich.console import Console

    # A spinner on a terminal while the model loads (the first use of a GGUF on torch or mlx
    # converts it once, about 20 s for SmolLM2-135M); nothing when stderr is not a terminal.
    with Console(stderr=True).status(f"loading {model} ({backend}) ...", spinner="dots"):
        be = get_backend(backend, model)
    with be:
        result = be.chat(messages, params)
    _out(result.text.strip())
    if verbose:
        tps = result.completion_tokens / result.latency_s if result.latency_s else 0.0
        sys.stderr.write(
            f"[{result.backend} {result.model}] prompt={result.prompt_tokens} "
            f"completion={result.completion_tokens} finish={result.finish_reason} "
            f"{result.latency_s:.2f}s {tps:.1f} tok/s\n"
        )


# --- models ---------------------------------------------------------------------------------


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Built-in aliases and converted models in the cache."""
    from localforge.models import list_models

    rows = list_models()
    if as_json:
        _out(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "kind", "installed", "files", "description")
    for r in rows:
        files = "\n".join(p for p in (r["gguf_path"], r["hf_path"]) if p)
        table.add_row(r["name"], r["kind"], "yes" if r["installed"] else "no", files, r["description"])
    Console().print(table)


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="Alias, HF folder, .gguf file or cached repo id.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Where a model reference resolves to, without loading it."""
    from localforge.models import resolve

    data = resolve(ref).to_dict()
    if as_json:
        _out(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if value not in (None, "", {}):
            _out(f"{key:12} {value}")


@models_app.command("convert")
def models_convert(ref: Annotated[str, typer.Argument(help="An alias or .gguf file.")]) -> None:
    """Convert a GGUF model to a HF safetensors folder once (cached); print its path."""
    from localforge.models import ensure_hf, resolve

    _out(ensure_hf(resolve(ref)))


# --- entry point ----------------------------------------------------------------------------


def main() -> None:
    """Run the app; print a one-line error instead of a traceback for anything expected."""
    from localforge.errors import LocalforgeError

    try:
        code = app(standalone_mode=False)
    except LocalforgeError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # usage errors from typer's click, and anything unexpected
        if type(exc).__name__ == "Abort":
            _fail("aborted", 130)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # a click usage error
            if not exc.format_message():  # no arguments: click has printed the help
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx else ""
            _fail(f"{exc.format_message()}{hint}", exc.exit_code)
        if os.environ.get("LOCALFORGE_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (set LOCALFORGE_DEBUG=1 for the traceback)", 1)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    sys.stderr.write(f"error: {first}\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
