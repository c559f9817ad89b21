"""`localforge teach dataset`: export, sign, verify, inspect and import distillation datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common
from localforge.commands.common import out

app = typer.Typer(help="Export, sign, verify, inspect and import distillation datasets.",
                  no_args_is_help=True, context_settings=common.HELP)

Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@app.command("export")
def export_cmd(
    src: Annotated[Path, typer.Argument(metavar="IN", help="Pairs JSONL (teach output, DCR output, an earlier export).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The training JSONL to write.")],
    min_quality: Annotated[float | None, typer.Option(
        "--min-quality", help="Keep rows scored at least this (0..1); unscored rows are left out.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="messages (chat) or prompt-completion.")] = "messages",
    sign: Annotated[bool, typer.Option(
        "--sign", help="Sign each row (HMAC-SHA256) with the key in $LOCALFORGE_SIGNING_KEY.")] = False,
    as_json: Json = False,
) -> None:
    """Write pairs as rows `localforge finetune` (and mlx-lm, TRL) train on; metadata under `metadata`."""
    from localforge.teach import dataset

    summary = dataset.export(src, output, min_quality=min_quality, fmt=fmt, sign=sign)
    if as_json:
        out(json.dumps({"output": str(output), **vars(summary)}, indent=2))
        return
    left = []
    if summary.below_quality:
        left.append(f"{summary.below_quality} below --min-quality {min_quality}")
    if summary.unscored:
        left.append(f"{summary.unscored} unscored")
    signed = f", signed with key {summary.key_id}" if summary.key_id else ""
    dropped = f" (left out: {', '.join(left)})" if left else ""
    out(f"wrote {summary.written} of {summary.rows_in} rows to {output} as {summary.format}{signed}{dropped}")


@app.command("verify")
def verify_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A signed dataset (JSONL).")],
    keys: Annotated[str | None, typer.Option(
        "--keys", help="Comma-separated environment variables holding the keys to accept "
                       "(default LOCALFORGE_SIGNING_KEY; <VAR>_ID names a key's id).")] = None,
    as_json: Json = False,
) -> None:
    """Check every row's signature; report tampered, unsigned and unknown-key rows by line (exit 1 if any)."""
    from localforge.errors import UsageError
    from localforge.teach import dataset, signing

    names = [k.strip() for k in keys.split(",")] if keys is not None else [signing.KEY_ENV]
    if not names or any(not n for n in names):
        raise UsageError(f"--keys {keys!r}: give comma-separated environment variable names, e.g. "
                         "--keys LOCALFORGE_SIGNING_KEY,OLD_SIGNING_KEY")
    report = dataset.verify(file, names)
    if as_json:
        out(json.dumps({"file": report.path, "rows": report.rows, "counts": dict(report.counts),
                        "problems": [{"line": n, "status": s, "detail": d} for n, s, d in report.problems]},
                       indent=2))
    else:
        for n, status, detail in report.problems:
            out(f"line {n}: {status}: {detail}")
        counts = ", ".join(f"{report.counts[s]} {s}" for s in ("verified", "tampered", "unsigned", "unknown-key")
                           if report.counts[s] or s == "verified")
        out(f"{report.path}: {report.rows} rows: {counts}")
    if not report.ok:
        raise typer.Exit(1)


@app.command("stats")
def stats_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Pairs or an exported dataset (JSONL).")],
    as_json: Json = False,
) -> None:
    """Counts, quality distribution, signers, teachers and sources."""
    from localforge.teach import dataset

    s = dataset.stats(file)
    if as_json:
        out(json.dumps(s, indent=2))
        return
    q = s["quality"]
    out(f"{s['file']}: {s['rows']} rows ({', '.join(f'{n} {k}' for k, n in s['formats'].items())})")
    if q["scored"]:
        out(f"quality: {q['scored']} scored, {q['unscored']} unscored; min {q['min']:.3g}, mean {q['mean']:.3g}, "
            f"max {q['max']:.3g}")
        width = max(b["rows"] for b in q["histogram"]) or 1
        for b in q["histogram"]:
            bar = "#" * round(30 * b["rows"] / width)
            out(f"  {b['from']:.1f}-{b['to']:.1f}  {b['rows']:>6}  {bar}")
    else:
        out(f"quality: none scored ({q['unscored']} rows)")
    out("signers: " + ", ".join(f"{k} {n}" for k, n in sorted(s["signers"].items())))
    if s["teachers"]:
        out("teachers: " + ", ".join(f"{k} {n}" for k, n in sorted(s["teachers"].items())))
    src = s["sources"]
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(src["kinds"].items())) or "none"
    out(f"sources: {src['rows_with_sources']} rows with sources ({kinds}); {src['documents']} documents, logs or files, "
        f"{src['records']} records")


@app.command("import")
def import_cmd(
    log: Annotated[Path, typer.Argument(metavar="LOG", help="A conversation log: JSONL rows of `messages`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The pairs JSONL to write.")],
    as_json: Json = False,
) -> None:
    """Turn each assistant turn that answers a user turn into a pair (earlier turns as its context)."""
    from localforge.teach import dataset

    summary = dataset.import_log(log, output)
    if as_json:
        out(json.dumps({"output": str(output), **vars(summary)}, indent=2))
        return
    skipped = f"; skipped {summary.skipped_turns} assistant turns not answering a user turn" \
        if summary.skipped_turns else ""
    out(f"wrote {summary.pairs} pairs from {summary.conversations} conversations to {output}{skipped}")
