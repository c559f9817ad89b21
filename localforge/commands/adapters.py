"""`localforge adapters`: move a LoRA adapter between mlx-lm and PEFT, or fuse it into its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common
from localforge.commands.common import out

app = typer.Typer(help="Convert LoRA adapters between mlx-lm and PEFT; fuse them into a model.",
                  no_args_is_help=True, context_settings=common.HELP)


def _format(value: str) -> str:
    from localforge.adapters import WEIGHTS

    if value not in WEIGHTS:
        raise typer.BadParameter(f"unknown adapter format {value!r}: use {' or '.join(WEIGHTS)}")
    return value


@app.command("convert")
def adapters_convert(
    adapter: Annotated[Path, typer.Argument(help="An adapter folder (mlx-lm or PEFT).")],
    to: Annotated[str, typer.Option("--to", callback=lambda v: _format(v), help="The format to write: mlx or peft.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The folder to write (new or empty).")],
    base: Annotated[str | None, typer.Option("--base", help="The base model, if the adapter config does not name one that resolves.")] = None,
) -> None:
    """Convert a LoRA (or DoRA) adapter between mlx-lm and PEFT; print the new folder."""
    from localforge.adapters import convert

    out(str(convert(adapter, to, output, base)))


@app.command("fuse")
def adapters_fuse(
    adapter: Annotated[Path, typer.Argument(help="An adapter folder (mlx-lm or PEFT).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The model folder to write (new or empty).")],
    base: Annotated[str | None, typer.Option("--base", help="The base model (default: the one the adapter config names).")] = None,
) -> None:
    """Merge an adapter into its base model: a plain HF folder any backend loads; print it."""
    from localforge.backends import fuse

    out(str(fuse(adapter, output, base)))
