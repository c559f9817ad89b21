"""Reading what `localforge extract` wrote: the records, their ids, and the source text their spans
point into. Shared by the review page and by the jobs that use records (``teach generate``).

A record is one line of the extraction output: its fields, ``_id``, ``_grounding`` (per field path:
status, start, end, page, score) and ``_provenance`` (source, file_sha256, converter, mode, chunk,
...). Spans are character offsets into the document's converted text (Markdown for docling
formats), which ``source_text`` rebuilds from the file through the same converter and its cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from localforge.resumable import read_rows, sidecar

GROUNDED = ("exact", "normalized", "fuzzy")  # strongest first; "ungrounded" is the fourth status


def record_id(fields: dict, file_sha256: str) -> str:
    """A record's id: its document's sha256 and its fields, hashed (16 hex). The same record of the
    same document has the same id in every run; extract writes it as ``_id``."""
    text = json.dumps({"document": file_sha256, "fields": fields}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fields_of(row: dict) -> dict:
    """A record's own fields (everything but the ``_`` keys)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def id_of(row: dict) -> str:
    """The record's ``_id``, or the one it would have (outputs written before extract wrote ids)."""
    given = row.get("_id")
    return given if isinstance(given, str) and given else record_id(fields_of(row), row["_provenance"]["file_sha256"])


def is_record(row: Any) -> bool:
    """Whether a row has the shape extract writes: an object with ``_grounding`` and a document hash."""
    return (isinstance(row, dict) and isinstance(row.get("_grounding"), dict)
            and isinstance(row.get("_provenance"), dict)
            and isinstance(row["_provenance"].get("file_sha256"), str)
            and isinstance(row["_provenance"].get("source"), str))


def finished_documents(records: Path) -> set[str] | None:
    """The document hashes whose extraction into ``records`` finished (its progress file says so),
    or None when there is no progress file beside it to tell. The records of any other document are
    from a run that was stopped: a re-run of extract drops and redoes them."""
    progress = sidecar(records, "progress")
    if not progress.is_file():
        return None
    return {row["sha256"] for row in read_rows(progress) if isinstance(row, dict) and isinstance(row.get("sha256"), str)}


def source_path(prov: dict, records: Path | None = None) -> Path:
    """The source document: as written in the provenance, else beside the records file."""
    given = Path(prov["source"])
    if not given.exists() and records is not None and not given.is_absolute():
        beside = records.parent / given
        if beside.exists():
            return beside
    return given


@functools.lru_cache(maxsize=4)
def _converter(pdf_mode: str):
    from localforge.extract.convert import Converter

    return Converter(pdf_mode=pdf_mode)  # one per mode: docling's converter is slow to build


def source_text(prov: dict, records: Path | None = None) -> str | None:
    """The converted text of a record's document, or None when the file is gone, no longer
    converts, or has changed since extraction (its sha256 differs): spans would point elsewhere."""
    from localforge.extract.convert import DocumentError

    mode = prov.get("mode", "")
    pdf_mode = mode.removeprefix("docling-") if mode.startswith("docling-") else "auto"
    try:
        doc = _converter(pdf_mode).convert(source_path(prov, records))
    except (DocumentError, OSError):
        return None
    return doc.text if doc.sha256 == prov["file_sha256"] else None
