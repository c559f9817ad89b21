"""`localforge extract`: documents to grounded JSONL records, with a progress bar and a summary;
`localforge extract review`: the records as an HTML page."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common
from localforge.commands.common import out

app = common.group("Extract schema-checked, grounded records from documents; review them.")
EXTRACTION = "Extraction"


@common.default(app, allow_extra_args=True)
def extract(
    paths: Annotated[list[str], typer.Argument(
        help="Files or folders (PDF, DOCX, PPTX, HTML, Markdown, text); key=value arguments override settings.",
        metavar="PATH... [KEY=VALUE]...")],
    output: Annotated[str, typer.Option("--output", "-o", help="The JSONL file to write (appended; resumable; its folder is created).")] = "records.jsonl",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="A YAML file of extraction settings (the keys below, and schema, fields, examples).")] = None,
    schema: Annotated[str | None, typer.Option("--schema", help="A JSON Schema file for one record, or module:Class (pydantic).", rich_help_panel=EXTRACTION)] = None,
    fields: Annotated[str | None, typer.Option("--fields", help='Inline fields: "title:str, release:str, frequency_mhz:float".', rich_help_panel=EXTRACTION)] = None,
    examples: Annotated[str | None, typer.Option("--examples", help='Few-shot examples: a JSON list of {"text", "records"}.', rich_help_panel=EXTRACTION)] = None,
    route: Annotated[str | None, typer.Option("--route", help='With --model SMALL,LARGE: when LARGE is used (default "chars>20000|tables>2"; also pages>N).', rich_help_panel=EXTRACTION)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="Sampling temperature (default 0).", rich_help_panel=EXTRACTION)] = None,
    passes: Annotated[int | None, typer.Option("--passes", help="Independent passes, merged: more recall, more calls (default 1).", rich_help_panel=EXTRACTION)] = None,
    chunk_size: Annotated[int | None, typer.Option("--chunk-size", help="Tokens per chunk (default 384).", rich_help_panel=EXTRACTION)] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", help="Tokens shared by neighbouring chunks (default 48).", rich_help_panel=EXTRACTION)] = None,
    cache: Annotated[bool | None, typer.Option("--cache/--no-cache", help="Reuse answers from the call cache (default on).", rich_help_panel=EXTRACTION)] = None,
    pdf_password: Annotated[str | None, typer.Option("--pdf-password", help="The password that opens encrypted PDFs.", rich_help_panel=EXTRACTION)] = None,
    backend: common.Backend = None,
    model: Annotated[str | None, typer.Option("--model", "-m", rich_help_panel=common.MODEL_PANEL, help="A model, or SMALL,LARGE to route by document complexity.")] = None,
    base_url: common.BaseUrl = None,
    api_key_env: common.ApiKeyEnv = None,
    timeout: common.Timeout = None,
    concurrency: common.Concurrency = None,
) -> None:
    """Extract schema-checked, grounded records from documents into JSONL.

    Settings come from --config FILE, then KEY=VALUE arguments (chunk_size=256), then flags.
    Re-running skips finished documents. Review the result with
    `localforge extract review OUT.jsonl -o review.html`.
    """
    from localforge.extract.pipeline import (
        check_free,
        check_output,
        check_paths,
        load_extract_settings,
    )

    overrides, paths = common.split_args(paths)
    flags = {"schema": ("--schema", schema), "fields": ("--fields", fields), "examples": ("--examples", examples),
             "route": ("--route", route), "temperature": ("--temperature", temperature), "passes": ("--passes", passes),
             "chunk_size": ("--chunk-size", chunk_size), "overlap": ("--overlap", overlap), "cache": ("--cache", cache),
             "pdf_password": ("--pdf-password", pdf_password),
             **common.backend_flags(backend, model, base_url, api_key_env, timeout, concurrency)}
    if not paths:
        from localforge.errors import UsageError

        raise UsageError("give at least one file or folder to extract from")
    settings = load_extract_settings(config, overrides, flags)
    check_paths([Path(p) for p in paths])  # before the progress bar is drawn: one line, nothing else
    check_output(output)  # the text as given: "out/" is a folder meant, not a file
    check_free(Path(output))
    common.engine_note(settings.backend)
    raise typer.Exit(_run([Path(p) for p in paths], Path(output), settings))


def _run(paths: list[Path], output: Path, settings) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from localforge.extract.pipeline import run, sidecar

    console = common.console(stderr=True)
    records = {"n": 0}
    started = {"any": False}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                  transient=False, disable=not console.is_terminal) as bar:  # logs get the summary alone
        docs = bar.add_task("documents", total=None, rate="")
        chunks = bar.add_task("chunks", total=0, rate="")

        def on_event(kind, **data):
            if kind == "start":
                bar.update(docs, total=data["files"])
            elif kind == "notice":
                console.print(f"[yellow]note:[/] {data['text']}")
            elif kind == "document":
                started["any"] = True
                bar.update(chunks, total=bar.tasks[chunks].total + data["chunks"])
            elif kind == "chunk":
                bar.advance(chunks)
            elif kind in ("done", "skipped", "failed"):
                bar.advance(docs)
                if kind == "done":
                    records["n"] += data["records"]
                    elapsed = bar.tasks[docs].elapsed or 1e-9
                    bar.update(docs, rate=f"{records['n'] / elapsed:.2f} records/s")
                if kind == "failed" and started["any"]:  # else the run may end in one error line
                    console.print(f"[red]failed:[/] {data['reason']}")

        try:
            summary = run(paths, output, settings, on_event)
        except BaseException:
            bar.live.transient = True  # the error is the one line; no half-drawn bars
            raise

    table = Table(title="extract", show_header=False)
    table.add_row("documents", f"{summary.done} done, {summary.skipped} already done, {len(summary.failed)} failed")
    table.add_row("chunks", f"{summary.chunks} ({settings.passes} pass{'es' if settings.passes > 1 else ''})")
    table.add_row("records", f"{summary.records} -> {output}")
    table.add_row("grounded values", f"{summary.grounded}/{summary.values} ({summary.grounded_share:.0%})")
    table.add_row("rejected chunks", f"{summary.rejects}" + (f" -> {sidecar(output, 'rejects')}" if summary.rejects else ""))
    if summary.rejected_records:
        table.add_row("rejected records", f"{summary.rejected_records} (echoed the field names or an example) "
                                          f"-> {sidecar(output, 'rejects')}")
    table.add_row("time", f"{summary.seconds:.1f} s")
    console.print(table)
    for path, reason in summary.failed:
        sys.stderr.write(f"failed: {path}: {reason}\n")
    return 1 if summary.failed else 0


@app.command("review", context_settings=common.HELP)
def review(
    records: Annotated[Path, typer.Argument(help="The JSONL file `extract` wrote.")],
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("review.html"),
) -> None:
    """Write a self-contained HTML page showing each source with its extracted values."""
    from localforge.extract.review import write_review

    out(str(write_review(records, output)))
