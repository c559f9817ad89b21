"""Rendering for `localforge extract`: a progress bar while it runs, a summary table after."""

from __future__ import annotations

import sys
from pathlib import Path

from localforge.errors import ConfigError
from localforge.jsonfiles import read_json


def _examples(path: Path | None) -> list[dict]:
    if path is None:
        return []
    data = read_json(path, "--examples")
    if not isinstance(data, list) or not all(isinstance(e, dict) and {"text", "records"} <= set(e) for e in data):
        raise ConfigError(f'--examples {path}: expected a list of {{"text": ..., "records": [...]}}')
    return data


def run_extract(paths, out, schema, fields, examples, backend, model, route, base_url, temperature,
                passes, concurrency, chunk_size, overlap, cache) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from localforge.extract.pipeline import ExtractSettings, run, sidecar
    from localforge.extract.schema import load_schema

    settings = ExtractSettings(
        schema=load_schema(schema, fields), backend=backend, model=model, route=route, base_url=base_url,
        temperature=temperature, passes=passes, concurrency=concurrency, chunk_size=chunk_size,
        overlap=overlap, cache=cache, examples=_examples(examples),
    )
    console = Console(stderr=True)
    records = {"n": 0}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                  transient=False) as bar:
        docs = bar.add_task("documents", total=None, rate="")
        chunks = bar.add_task("chunks", total=0, rate="")

        def on_event(kind, **data):
            if kind == "start":
                bar.update(docs, total=data["files"])
            elif kind == "notice":
                console.print(f"[yellow]note:[/] {data['text']}")
            elif kind == "document":
                bar.update(chunks, total=bar.tasks[chunks].total + data["chunks"])
            elif kind == "chunk":
                bar.advance(chunks)
            elif kind in ("done", "skipped", "failed"):
                bar.advance(docs)
                if kind == "done":
                    records["n"] += data["records"]
                    elapsed = bar.tasks[docs].elapsed or 1e-9
                    bar.update(docs, rate=f"{records['n'] / elapsed:.2f} records/s")
                if kind == "failed":
                    console.print(f"[red]failed:[/] {data['reason']}")

        summary = run(paths, out, settings, on_event)

    from rich.table import Table

    table = Table(title="extract", show_header=False)
    table.add_row("documents", f"{summary.done} done, {summary.skipped} already done, {len(summary.failed)} failed")
    table.add_row("chunks", f"{summary.chunks} ({settings.passes} pass{'es' if settings.passes > 1 else ''})")
    table.add_row("records", f"{summary.records} -> {out}")
    table.add_row("grounded values", f"{summary.grounded}/{summary.values} ({summary.grounded_share:.0%})")
    table.add_row("rejected chunks", f"{summary.rejects}" + (f" -> {sidecar(out, 'rejects')}" if summary.rejects else ""))
    table.add_row("time", f"{summary.seconds:.1f} s")
    console.print(table)
    for path, reason in summary.failed:
        sys.stderr.write(f"failed: {path}: {reason}\n")
    return 1 if summary.failed else 0
