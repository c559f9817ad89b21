"""`localforge models`: list, inspect and prepare models (offline), or list what a server offers."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from localforge.commands import common
from localforge.commands.common import out

app = typer.Typer(help="List, inspect and prepare models (offline).", no_args_is_help=True,
                  context_settings=common.HELP)


@app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    backend: Annotated[str | None, typer.Option(
        "--backend", "-b", callback=common.known_backend, help="A server backend: list what it serves.")] = None,
    base_url: common.BaseUrl = None,
    api_key_env: common.ApiKeyEnv = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1)] = 10.0,
) -> None:
    """Built-in aliases and converted models in the cache, or what a server offers."""
    if backend:
        from localforge.backends import served_models

        names = served_models(backend, base_url=base_url, api_key_env=api_key_env, timeout=timeout)
        out(json.dumps(names, indent=2) if as_json else "\n".join(names))
        return
    from localforge.models import list_models

    rows = list_models()
    if as_json:
        out(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("name", "kind", "installed", "files", "description")
    for r in rows:
        files = "\n".join(p for p in (r["gguf_path"], r["hf_path"]) if p)
        table.add_row(r["name"], r["kind"], "yes" if r["installed"] else "no", files, r["description"])
    common.console().print(table)


@app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="Alias, HF folder, .gguf file or cached repo id.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Where a model reference resolves to, without loading it (its headers are checked)."""
    from localforge.models import check_files, resolve

    model = resolve(ref)
    check_files(model)
    data = model.to_dict()
    if as_json:
        out(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if value not in (None, "", {}):
            out(f"{key:12} {value}")


@app.command("convert")
def models_convert(ref: Annotated[str, typer.Argument(help="An alias or .gguf file.")]) -> None:
    """Convert a GGUF model to a HF safetensors folder once (cached); print its path."""
    from localforge.backends import ensure_hf
    from localforge.models import resolve

    out(ensure_hf(resolve(ref)))
