"""`localforge export`: a run, an adapter or a model folder as a merged HF folder, a GGUF file or
an Ollama folder; `localforge export setup` fetches llama.cpp's converter once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common
from localforge.commands.common import out

app = common.group("Export a fine-tuned model: a merged HF folder, a GGUF file, or an Ollama folder.")


@common.default(app)
def export_run(
    source: Annotated[Path, typer.Argument(metavar="RUN_DIR|ADAPTER", help="A fine-tuning run folder, an adapter folder (PEFT or mlx-lm), or a HF model folder.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="What to write: hf (a merged folder), gguf (one .gguf file), ollama (a folder with the GGUF and a Modelfile).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The folder to write (new or empty); for --to gguf the .gguf file.", show_default=False)],
    quant: Annotated[str | None, typer.Option("--quant", help="GGUF type for gguf and ollama: f16 (default), q8_0, bf16, f32, q4_0, q4_k_m, q5_k_m, q6_k.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="The Ollama model name (default: the output folder's name).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="The base model of an adapter, if its config does not name one that resolves.")] = None,
) -> None:
    """Export RUN_DIR|ADAPTER --to hf|gguf|ollama -o OUT; print what was written."""
    from localforge.export import export, plan

    p = plan(source, to, output, quant=quant, name=name, base=base)
    con = common.console(stderr=True)
    with con.status(f"exporting {source} to {to} ...", spinner="dots") as status:
        def on_event(kind: str, **data) -> None:
            if kind == "step":
                status.update(f"{data['what']} ...")

        result = export(p, on_event)
    size = f"{result.bytes / 1e6:.1f} MB"
    con.print(f"exported {source} to {to} in {result.seconds:.1f} s ({size})", highlight=False)
    out(str(result.path))
    if result.command:
        out(result.command)


@app.command("setup")
def export_setup(
    sdist: Annotated[Path | None, typer.Option("--sdist", help="The llama-cpp-python source distribution (.tar.gz) of the installed version, if pip cannot fetch it here.")] = None,
) -> None:
    """Unpack llama.cpp's HF-to-GGUF converter from the installed llama-cpp-python's source
    distribution (pip fetches it once) into the cache; print where."""
    from localforge.backends import install_converter

    with common.console(stderr=True).status("setting up llama.cpp's GGUF converter ...", spinner="dots"):
        folder = install_converter(sdist)
    out(str(folder))
