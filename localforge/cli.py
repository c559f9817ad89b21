"""The `localforge` command: parse, call the library, render. Nothing else lives here.

Heavy modules are imported inside commands so `localforge --help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
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
adapters_app = typer.Typer(help="Convert LoRA adapters between mlx-lm and PEFT; fuse them into a model.",
                           no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


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
    backend: Annotated[str, typer.Option("--backend", "-b", help="auto, torch, mlx, llamacpp, vllm, openai, lmstudio, vllm-server, ollama.")] = "auto",
    model: Annotated[str, typer.Option("--model", "-m", help="Alias, HF folder, .gguf file, cached repo id, or a served model name.")] = "smollm2-135m",
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")] = None,
    json_schema: Annotated[Path | None, typer.Option("--json-schema", help="A JSON Schema file: print a JSON object that validates.")] = None,
    base_url: Annotated[str | None, typer.Option("--base-url", help="Server URL for server backends.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds per call, retries included (servers).")] = 120.0,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse answers from the call cache.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print usage and timing to stderr.")] = False,
    adapter: Annotated[Path | None, typer.Option("--adapter", help="A LoRA adapter folder (mlx-lm or PEFT) to load on the model (torch, mlx).")] = None,
) -> None:
    """Answer one prompt with a local model (or a server) and print the answer."""
    from localforge.backends import GenerationParams, get_backend

    schema = _read_schema(json_schema) if json_schema else None
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
        be = get_backend(backend, model, cache=cache or None,
                         **_server_options(backend, base_url, api_key_env, timeout),
                         **({"adapter": str(adapter)} if adapter else {}))
    with be:
        if schema is not None:
            _out(json.dumps(be.generate_json(messages, schema, params), ensure_ascii=False))
            return
        result = be.chat(messages, params)
    _out(result.text.strip())
    if verbose:
        tps = result.completion_tokens / result.latency_s if result.latency_s else 0.0
        sys.stderr.write(
            f"[{result.backend} {result.model}] prompt={result.prompt_tokens} "
            f"completion={result.completion_tokens} finish={result.finish_reason} "
            f"{result.latency_s:.2f}s {tps:.1f} tok/s{' (cached)' if result.cached else ''}\n"
        )


def _server_options(backend: str, base_url: str | None, api_key_env: str, timeout: float) -> dict:
    from localforge.backends import REGISTRY

    spec = REGISTRY.get(backend)
    if spec is None or not spec.server:
        if base_url:
            from localforge.errors import ConfigError

            raise ConfigError(f"--base-url is for server backends; backend '{backend}' runs in-process")
        return {}
    options = {"base_url": base_url, "timeout": timeout}
    if backend != "ollama":
        options["api_key_env"] = api_key_env
    return options


def _read_schema(path: Path) -> dict:
    from localforge.jsonfiles import check_json_schema, read_json

    return check_json_schema(read_json(path, "--json-schema"), f"--json-schema {path}")


# --- models ---------------------------------------------------------------------------------


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    backend: Annotated[str | None, typer.Option("--backend", "-b", help="A server backend: list what it serves.")] = None,
    base_url: Annotated[str | None, typer.Option("--base-url")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env")] = "OPENAI_API_KEY",
    timeout: Annotated[float, typer.Option("--timeout", min=0.1)] = 10.0,
) -> None:
    """Built-in aliases and converted models in the cache, or what a server offers."""
    if backend:
        from localforge.backends import REGISTRY, backend_class
        from localforge.errors import ConfigError

        if backend in REGISTRY and not REGISTRY[backend].server:
            raise ConfigError(f"models list --backend lists what a server offers; '{backend}' runs in-process")
        be = backend_class(backend)("", **_server_options(backend, base_url, api_key_env, timeout))
        with be:
            names = be.list_models()
        _out(json.dumps(names, indent=2) if as_json else "\n".join(names))
        return
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


# --- extract --------------------------------------------------------------------------------


@app.command()
def extract(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (PDF, DOCX, PPTX, HTML, Markdown, text).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="The JSONL file to write (appended; resumable).")] = Path("records.jsonl"),
    schema: Annotated[str | None, typer.Option("--schema", help="A JSON Schema file for one record, or module:Class (pydantic).")] = None,
    fields: Annotated[str | None, typer.Option("--fields", help='Inline fields: "title:str, release:str, frequency_mhz:float".')] = None,
    examples: Annotated[Path | None, typer.Option("--examples", help='Few-shot examples: a JSON list of {"text", "records"}.')] = None,
    backend: Annotated[str, typer.Option("--backend", "-b")] = "auto",
    model: Annotated[str, typer.Option("--model", "-m", help="A model, or SMALL,LARGE to route by document complexity.")] = "smollm2-135m",
    route: Annotated[str | None, typer.Option("--route", help='When LARGE is used (default "chars>20000|tables>2"); also pages>N.')] = None,
    base_url: Annotated[str | None, typer.Option("--base-url")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0)] = 0.0,
    passes: Annotated[int, typer.Option("--passes", min=1, help="Independent passes, merged (more recall, more calls).")] = 1,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Parallel requests to a server backend.")] = 4,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=16, help="Tokens per chunk.")] = 384,
    overlap: Annotated[int, typer.Option("--overlap", min=0, help="Tokens shared by neighbouring chunks.")] = 48,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse answers from the call cache.")] = True,
) -> None:
    """Extract schema-checked, grounded records from documents into JSONL.

    Re-running skips finished documents. Review the result with
    `localforge extract review OUT.jsonl -o review.html`.
    """
    from localforge.extract.cli import run_extract

    code = run_extract(paths, out, schema, fields, examples, backend, model, route, base_url, temperature,
                       passes, concurrency, chunk_size, overlap, cache)
    raise typer.Exit(code)


@app.command("extract-review", hidden=True)
def extract_review(
    records: Annotated[Path, typer.Argument(help="The JSONL file `extract` wrote.")],
    out: Annotated[Path, typer.Option("--output", "-o")] = Path("review.html"),
) -> None:
    """Write a self-contained HTML page showing each source with its extracted values."""
    from localforge.extract.review import write_review

    _out(str(write_review(records, out)))


# --- finetune -------------------------------------------------------------------------------


_PROCESS_OPTIONS = "multi-process (accelerate)"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def finetune(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="The YAML config; any key can be overridden as key=value.")],
    backend: Annotated[str | None, typer.Option("--backend", "-b", help="auto, mlx or torch (overrides the config).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan for this machine; do not train.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as JSON.")] = False,
    num_processes: Annotated[int | None, typer.Option("--num-processes", help="Training processes in all (accelerate launch); default: one per GPU.", rich_help_panel=_PROCESS_OPTIONS)] = None,
    num_machines: Annotated[int, typer.Option("--num-machines", rich_help_panel=_PROCESS_OPTIONS)] = 1,
    machine_rank: Annotated[int, typer.Option("--machine-rank", rich_help_panel=_PROCESS_OPTIONS)] = 0,
    main_process_ip: Annotated[str | None, typer.Option("--main-process-ip", rich_help_panel=_PROCESS_OPTIONS)] = None,
    main_process_port: Annotated[int | None, typer.Option("--main-process-port", rich_help_panel=_PROCESS_OPTIONS)] = None,
    accelerate_config: Annotated[str | None, typer.Option("--accelerate-config", help="An `accelerate config` file (FSDP, DeepSpeed, multi-node).", rich_help_panel=_PROCESS_OPTIONS)] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
) -> None:
    """LoRA/DoRA/full fine-tuning from one config, on MLX or torch, planned for this machine.

    `localforge finetune resume RUN_DIR` (then any key=value overrides) continues a stopped run exactly.
    """
    from localforge.finetune.cli import run_finetune
    from localforge.finetune.launch import Launch

    overrides = list(ctx.args) + ([f"backend={backend}"] if backend else [])
    launch = Launch(num_processes or 0, num_machines, machine_rank, main_process_ip, main_process_port,
                    accelerate_config)
    run_finetune(config, overrides, dry_run, as_json, launch, progress)


@app.command("finetune-resume", hidden=True, context_settings={"allow_extra_args": True})
def finetune_resume(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="The output_dir of a stopped run.")],
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
) -> None:
    """Continue a stopped run from its newest checkpoint (adapter, optimizer, schedule, data order, RNG)."""
    from localforge.finetune.cli import resume_finetune

    resume_finetune(run_dir, list(ctx.args), None, progress)


# --- adapters -------------------------------------------------------------------------------


@adapters_app.command("convert")
def adapters_convert(
    adapter: Annotated[Path, typer.Argument(help="An adapter folder (mlx-lm or PEFT).")],
    to: Annotated[str, typer.Option("--to", help="The format to write: mlx or peft.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="The folder to write (new or empty).")],
    base: Annotated[str | None, typer.Option("--base", help="The base model, if the adapter config does not name one that resolves.")] = None,
) -> None:
    """Convert a LoRA (or DoRA) adapter between mlx-lm and PEFT; print the new folder."""
    from localforge.finetune.adapters import convert

    _out(str(convert(adapter, to, out, base)))


@adapters_app.command("fuse")
def adapters_fuse(
    adapter: Annotated[Path, typer.Argument(help="An adapter folder (mlx-lm or PEFT).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="The model folder to write (new or empty).")],
    base: Annotated[str | None, typer.Option("--base", help="The base model (default: the one the adapter config names).")] = None,
) -> None:
    """Merge an adapter into its base model: a plain HF folder any backend loads; print it."""
    from localforge.finetune.adapters import fuse

    _out(str(fuse(adapter, out, base)))


# --- entry point ----------------------------------------------------------------------------


def main() -> None:
    """Run the app; print a one-line error instead of a traceback for anything expected."""
    from localforge.errors import LocalforgeError

    if sys.argv[1:3] in (["extract", "review"], ["finetune", "resume"]):  # sub-subcommands
        sys.argv[1:3] = ["-".join(sys.argv[1:3])]
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
