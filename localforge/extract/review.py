"""`localforge extract review OUT.jsonl -o review.html`: one self-contained page per run.

Each source document is shown with its extracted values highlighted at their grounded spans
(hover for the field and record); values that could not be located are listed in red.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

from localforge.errors import ConfigError
from localforge.extract.records import is_record, source_text

_CSS = """
body{font:14px/1.5 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:12px 20px;background:#1f2937;color:#fff}
section{margin:16px 20px;background:#fff;border:1px solid #ddd;border-radius:6px}
h2{font-size:15px;margin:0;padding:10px 14px;border-bottom:1px solid #eee;background:#f3f4f6}
.meta{color:#555;font-size:12px;padding:6px 14px}
.doc{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12.5px;padding:10px 14px;max-height:520px;overflow:auto}
mark{background:#fde68a;border-radius:2px}mark.normalized{background:#bfdbfe}mark.fuzzy{background:#fbcfe8}
table{border-collapse:collapse;margin:8px 14px 14px;font-size:12.5px}
td,th{border:1px solid #e5e7eb;padding:3px 8px;text-align:left;vertical-align:top}
.ungrounded{color:#b91c1c;font-weight:600}.legend span{padding:0 6px;margin-right:8px;border-radius:2px}
"""


def _load(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give the JSONL that `localforge extract` wrote")
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not is_record(row):
            if n == len(lines) and not line.endswith("\n"):
                break  # a last line cut short by a crash: the next run drops it too
            raise ConfigError(f"{path}, line {n}: not a record written by `localforge extract`") from None
        rows.append(row)
    return rows


def _highlight(text: str, spans: list[tuple[int, int, str, str]]) -> str:
    out, pos = [], 0
    for start, end, status, label in sorted(spans):
        if start < pos:
            continue  # overlapping spans: the first one wins
        out.append(html.escape(text[pos:start]))
        out.append(f'<mark class="{status}" title="{html.escape(label)}">{html.escape(text[start:end])}</mark>')
        pos = end
    out.append(html.escape(text[pos:]))
    return "".join(out)


def render(rows: list[dict]) -> str:
    by_doc: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_doc[row["_provenance"]["file_sha256"]].append(row)
    total = sum(len(r["_grounding"]) for r in rows)
    grounded = sum(g["status"] != "ungrounded" for r in rows for g in r["_grounding"].values())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>localforge extract review</title>"
             f"<style>{_CSS}</style></head><body><header><b>localforge extract review</b> — "
             f"{len(rows)} record{'' if len(rows) == 1 else 's'} from {len(by_doc)} document{'' if len(by_doc) == 1 else 's'}; {grounded}/{total} values grounded"
             "<div class='legend'><span style='background:#fde68a;color:#222'>exact</span>"
             "<span style='background:#bfdbfe;color:#222'>normalized</span>"
             "<span style='background:#fbcfe8;color:#222'>fuzzy</span>"
             "<span style='color:#fca5a5'>ungrounded</span></div></header>"]
    for doc_rows in by_doc.values():
        prov = doc_rows[0]["_provenance"]
        text = source_text(prov)
        spans, table = [], []
        for i, row in enumerate(doc_rows, 1):
            fields = {k: v for k, v in row.items() if not k.startswith("_")}
            for path, g in row["_grounding"].items():
                label = f"record {i}: {path}"
                if g["status"] != "ungrounded" and g["start"] is not None:
                    spans.append((g["start"], g["end"], g["status"], label))
            cells = "".join(
                f"<td class='{'ungrounded' if row['_grounding'].get(k, {}).get('status') == 'ungrounded' else ''}'>"
                f"{html.escape(json.dumps(v, ensure_ascii=False))}</td>" for k, v in fields.items())
            table.append(f"<tr><th>{i}</th>{cells}</tr>")
        head = "".join(f"<th>{html.escape(k)}</th>" for k in (k for k in doc_rows[0] if not k.startswith("_")))
        body = (f"<div class='doc'>{_highlight(text, spans)}</div>" if text is not None
                else "<div class='meta'>source not found or changed since extraction: values only</div>")
        parts.append(
            f"<section><h2>{html.escape(prov['source'])}</h2><div class='meta'>{html.escape(prov['converter'])}, "
            f"{html.escape(prov['mode'])}; {html.escape(prov['backend'])} / {html.escape(prov['model'])}; "
            f"sha256 {prov['file_sha256'][:12]}</div>{body}"
            f"<table><tr><th>#</th>{head}</tr>{''.join(table)}</table></section>")
    parts.append("</body></html>")
    return "".join(parts)


def write_review(records: Path, out: Path) -> Path:
    page = render(_load(records))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
