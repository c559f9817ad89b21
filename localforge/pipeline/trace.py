"""``localforge run trace RUN_DIR ROW``: a training row back through its pair and record to the
source document, page and character span, every link checked by hash or id."""

from __future__ import annotations

from pathlib import Path

from localforge.errors import ConfigError
from localforge.files import sha256_file
from localforge.pipeline.layout import Layout, read_rows

SPLITS = ("train", "valid", "test")


def _find(path: Path, test) -> tuple[int, dict] | None:
    for n, row in enumerate(read_rows(path), 1):
        if test(row):
            return n, row
    return None


def parse_row(row: str) -> tuple[str, int | str]:
    """``N`` (line N of train.jsonl), ``SPLIT:N``, or a pair id."""
    split, sep, rest = row.partition(":")
    if sep and split in SPLITS and rest.isdigit() and int(rest) >= 1:
        return split, int(rest)
    if row.isdigit() and int(row) >= 1:
        return "train", int(row)
    return "id", row


def trace(run_dir: str | Path, row: str) -> dict:
    """The chain for one training row: the row, the pair, (the improved pair,) and per value its
    record and source span, with whether the document still has that sha256 and the span's text."""
    from localforge.extract.records import source_text

    layout = Layout(Path(run_dir).expanduser().absolute())
    if not layout.manifest.exists():
        raise ConfigError(f"{run_dir}: not a `localforge run` folder (no manifest.json): give a pipeline's output_dir")
    split, which = parse_row(row)
    found = None
    if split == "id":
        for name in SPLITS:
            hit = _find(layout.split(name), lambda r: (r.get("metadata") or {}).get("id") == which)
            if hit:
                found, split = hit, name
                break
    else:
        path = layout.split(split)
        rows = read_rows(path)
        if which > len(rows):
            raise ConfigError(f"ROW {row}: {path} has {len(rows)} rows: give a line from 1 to {len(rows)}")
        found = which, rows[which - 1]
    if found is None:
        raise ConfigError(f"ROW {row}: no training row has that id in {layout.dataset}: give a line number, "
                          "SPLIT:N (train, valid, test) or a pair id")
    line, data = found
    meta = data.get("metadata") or {}
    prov = meta.get("provenance") or {}
    chain: dict = {"row": {"file": str(layout.split(split)), "line": line, "id": meta.get("id"),
                           "messages": data.get("messages") or [{"role": "user", "content": data.get("prompt")},
                                                                {"role": "assistant", "content": data.get("completion")}],
                           "quality": meta.get("quality"), "signed_by": prov.get("signer_key_id")}}
    pair = _find(layout.pairs, lambda r: r.get("id") == meta.get("id"))
    chain["pair"] = {"file": str(layout.pairs), "line": pair[0], "teacher": (pair[1].get("provenance") or {}).get("teacher"),
                     "answer_by": pair[1].get("answer_by")} if pair else None
    improved = _find(layout.improved, lambda r: r.get("id") == meta.get("id"))
    if improved:
        chain["improved"] = {"file": str(layout.improved), "line": improved[0], "score": improved[1].get("score")}
    chain["sources"] = []
    texts: dict[str, str | None] = {}
    for src in prov.get("sources") or []:
        records = Path(src.get("records") or layout.records)
        rid = src.get("record_id")
        rec = _find(records, lambda r, rid=rid: r.get("_id") == rid)
        doc = Path(src["document"]) if src.get("document") else None
        now = sha256_file(doc) if doc is not None and doc.is_file() else None
        state = "missing" if now is None else "unchanged" if now == src.get("document_sha256") else "changed"
        text = None
        if rec and state == "unchanged":
            if str(doc) not in texts:
                texts[str(doc)] = source_text(rec[1]["_provenance"], records)
            full = texts[str(doc)]
            start, end = src["span"]
            text = full[start:end] if full is not None else None
        chain["sources"].append({
            "field": src.get("field"), "value": src.get("value"), "grounding": src.get("grounding"),
            "record": {"file": str(records), "line": rec[0] if rec else None, "id": src.get("record_id")},
            "document": str(doc) if doc else None, "sha256": src.get("document_sha256"), "document_now": state,
            "page": src.get("page"), "span": src.get("span"), "text": text})
    return chain


def lines(chain: dict) -> list[str]:
    """The chain as the lines ``run trace`` prints."""
    r = chain["row"]
    user = next((m["content"] for m in reversed(r["messages"][:-1]) if m["role"] == "user"), "")
    out = [f"row      {r['file']} line {r['line']}  id {r['id']}  quality {r['quality']}"
           + (f"  signed by {r['signed_by']}" if r["signed_by"] else ""),
           f"  user:      {user}", f"  assistant: {r['messages'][-1]['content']}"]
    p = chain.get("pair")
    out.append(f"pair     {p['file']} line {p['line']}  teacher {(p['teacher'] or {}).get('model')}  "
               f"answer by {p['answer_by']}" if p else "pair     (not found in pairs.jsonl)")
    if chain.get("improved"):
        i = chain["improved"]
        out.append(f"improved {i['file']} line {i['line']}  score {i['score']}")
    for s in chain["sources"]:
        rec = s["record"]
        out.append(f"value    {s['field']} = {s['value']!r} ({s['grounding']})")
        out.append(f"  record   {rec['file']} line {rec['line']}  id {rec['id']}")
        page = f" page {s['page']}" if s["page"] is not None else ""
        out.append(f"  document {s['document']}{page} chars {s['span'][0]}-{s['span'][1]}  sha256 {str(s['sha256'])[:12]} "
                   f"({s['document_now']})")
        if s["text"] is not None:
            out.append(f"  text     {s['text']!r}")
    return out
