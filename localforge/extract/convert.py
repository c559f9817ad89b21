"""Documents to text with structure, through docling, cached by content hash.

PDF goes through docling's full pipeline (layout, tables, OCR) when its models are available
locally, and otherwise through the model-free native pipeline (text lines, no table structure).
Which one ran is reported once per run and written into every record's provenance.
DOCX, PPTX, HTML and Markdown go through docling's own backends; plain text is read as is.

Pre-fetch the full pipeline's models with docling's tool (`docling-tools models download`), with
`docling-slim[models-local]` installed, and point ``DOCLING_ARTIFACTS_PATH`` at them.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

from localforge.errors import LocalforgeError, MissingDependency
from localforge.files import sha256_file

DOCLING_SUFFIXES = {".pdf", ".docx", ".pptx", ".html", ".htm", ".md", ".markdown"}
TEXT_SUFFIXES = {".txt", ".text"}
SUPPORTED = DOCLING_SUFFIXES | TEXT_SUFFIXES
MAX_BYTES = 200 * 1024**2
_KINDS = {".pdf": "PDF", ".docx": "DOCX", ".pptx": "PPTX", ".html": "HTML", ".htm": "HTML",
          ".md": "Markdown", ".markdown": "Markdown"}


class DocumentError(LocalforgeError):
    """One file could not be converted; the run goes on with the others."""


@dataclass
class Converted:
    path: str
    sha256: str
    text: str  # Markdown for docling formats
    pages: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, page_no)
    converter: str = ""  # "docling-slim 2.143.0"
    mode: str = ""  # "docling-standard", "docling-native", "docling", "text"

    def page_at(self, offset: int) -> int | None:
        for start, end, page in self.pages:
            if start <= offset < end:
                return page
        return None


def full_pipeline_available() -> bool:
    """docling's layout models are installed and fetched locally (no hub access at run time)."""
    if find_spec("docling_ibm_models") is None:
        return False
    root = os.environ.get("DOCLING_ARTIFACTS_PATH")
    return bool(root) and Path(root).is_dir() and any(Path(root).iterdir())


class Converter:
    """Converts files, reusing one docling converter and a cache keyed by content hash."""

    def __init__(self, cache_dir: Path | None = None, pdf_mode: str = "auto", pdf_password: str | None = None):
        from localforge.models import cache_dir as default_cache

        self.cache_dir = (cache_dir or default_cache()) / "documents"
        self.pdf_password = pdf_password or None
        if pdf_mode == "auto":
            pdf_mode = "standard" if full_pipeline_available() else "native"
        self.pdf_mode = pdf_mode
        self._docling = None
        try:
            self.version = f"docling-slim {version('docling-slim')}"
        except PackageNotFoundError:
            self.version = "docling (not installed)"

    @property
    def notice(self) -> str:
        if self.pdf_mode == "native":
            return ("PDFs use docling's native pipeline (text lines, no layout or table models): "
                    "its models are not available locally; see `localforge extract --help`")
        return "PDFs use docling's full pipeline (layout, tables)"

    def _converter(self):
        if self._docling is None:
            if find_spec("docling") is None:
                raise MissingDependency("converting PDF, DOCX, PPTX, HTML and Markdown", "docs", "docling")
            from docling.datamodel.base_models import InputFormat
            from docling.document_converter import DocumentConverter, PdfFormatOption

            for name in ("docling", "docling_core", "docling_parse", "bs4"):
                # docling logs its own account of a bad file ("Input document x is not valid."): with
                # no logging set up Python would print it; the one-line DocumentError says it instead
                logger = logging.getLogger(name)
                if not logger.handlers:
                    logger.addHandler(logging.NullHandler())

            options = {}
            backend_options = None
            if self.pdf_password:
                from docling.datamodel.backend_options import ThreadedDoclingParseBackendOptions
                from pydantic import SecretStr

                backend_options = ThreadedDoclingParseBackendOptions(password=SecretStr(self.pdf_password))
            if self.pdf_mode == "native":
                from docling.datamodel.pipeline_options import NativePdfPipelineOptions
                from docling.pipeline.native_pdf_pipeline import NativePdfPipeline

                options[InputFormat.PDF] = PdfFormatOption(
                    pipeline_cls=NativePdfPipeline, pipeline_options=NativePdfPipelineOptions(),
                    backend_options=backend_options)
            else:
                from docling.datamodel.pipeline_options import PdfPipelineOptions

                opts = PdfPipelineOptions(artifacts_path=os.environ.get("DOCLING_ARTIFACTS_PATH"))
                options[InputFormat.PDF] = PdfFormatOption(pipeline_options=opts, backend_options=backend_options)
            self._docling = DocumentConverter(format_options=options)
        return self._docling

    def convert(self, path: Path) -> Converted:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED:
            raise DocumentError(f"{path}: unsupported file type '{suffix or '(none)'}' "
                                f"(supported: {', '.join(sorted(SUPPORTED))})")
        size = path.stat().st_size
        if size == 0:
            raise DocumentError(f"{path}: empty file")
        if size > MAX_BYTES:
            raise DocumentError(f"{path}: {size / 1024**2:.0f} MB is over the {MAX_BYTES // 1024**2} MB limit; split it")
        if suffix in TEXT_SUFFIXES | {".md", ".markdown", ".html", ".htm"}:
            with open(path, "rb") as fh:
                head = fh.read(8192)
            if b"\0" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 has NULs too
                raise DocumentError(f"{path}: binary data, not a {_KINDS.get(suffix, 'text')} file")
        sha = sha256_file(path)
        cached = self.cache_dir / f"{sha}-{self.pdf_mode}.json"
        if cached.is_file():
            try:
                data = json.loads(cached.read_text(encoding="utf-8"))
                data["pages"] = [tuple(p) for p in data["pages"]]
                return Converted(**{**data, "path": str(path)})
            except (ValueError, TypeError, KeyError):
                pass  # a damaged cache entry: convert again
        result = self._convert_text(path, sha) if suffix in TEXT_SUFFIXES else self._convert_docling(path, sha)
        if not result.text.strip():
            raise DocumentError(f"{path}: no text found (a scanned PDF needs OCR: docling's full pipeline)")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(result)), encoding="utf-8")
        tmp.replace(cached)
        return result

    def _convert_text(self, path: Path, sha: str) -> Converted:
        raw = path.read_bytes()
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return Converted(str(path), sha, raw.decode("utf-16", errors="replace"), [], "python", "text (UTF-16)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")  # keep going; say how it was read
            mode = "text (not UTF-8: read as cp1252)"
        else:
            mode = "text"
        return Converted(str(path), sha, text, [], "python", mode)

    def _check_pdf(self, path: Path) -> None:
        """Encrypted (and no or a wrong password) or not a PDF at all: say so in our words before
        docling does in its own. pypdfium2 comes with docling's PDF support; without it docling
        reports the failure and ``_unreadable`` words it."""
        if find_spec("pypdfium2") is None:
            return
        import pypdfium2 as pdfium

        try:
            pdfium.PdfDocument(str(path), password=self.pdf_password).close()
        except pdfium.PdfiumError as exc:
            if "password" in str(exc).lower():
                if self.pdf_password:
                    raise DocumentError(f"{path}: the PDF is encrypted and the password given (--pdf-password) "
                                        "does not open it") from None
                raise DocumentError(f"{path}: the PDF is encrypted; give its password with --pdf-password "
                                    "(pdf_password in a config file)") from None
            raise self._unreadable(path) from None

    @staticmethod
    def _unreadable(path: Path) -> DocumentError:
        kind = _KINDS.get(path.suffix.lower(), path.suffix.lstrip(".").upper())
        return DocumentError(f"{path}: cannot be read: corrupt or not a {kind} file")

    def _convert_docling(self, path: Path, sha: str) -> Converted:
        if path.suffix.lower() == ".pdf":
            self._check_pdf(path)
        try:
            with warnings.catch_warnings():  # e.g. bs4's "Some characters could not be decoded"
                warnings.simplefilter("ignore")
                result = self._converter().convert(str(path), raises_on_error=False)
        except MissingDependency:
            raise
        except Exception:  # noqa: BLE001 - docling raises many kinds for bad files, in its own words
            raise self._unreadable(path) from None
        status = getattr(result.status, "name", str(result.status))
        if status not in ("SUCCESS", "PARTIAL_SUCCESS"):
            raise self._unreadable(path)
        doc = result.document
        n_pages = doc.num_pages() if path.suffix.lower() == ".pdf" else 0
        mode = f"docling-{self.pdf_mode}" if path.suffix.lower() == ".pdf" else "docling"
        if n_pages <= 1:
            text = doc.export_to_markdown()
            return Converted(str(path), sha, text, [(0, len(text), 1)] if n_pages else [], self.version, mode)
        parts, pages, offset = [], [], 0
        for page_no, md in enumerate(_pages_markdown(doc, n_pages), 1):
            if parts:
                parts.append("\n\n")
                offset += 2
            parts.append(md)
            pages.append((offset, offset + len(md), page_no))
            offset += len(md)
        return Converted(str(path), sha, "".join(parts), pages, self.version, mode)



_PAGE_BREAK = "\u241cLOCALFORGE-PAGE-BREAK\u241c"


def _pages_markdown(doc, n_pages: int) -> list[str]:
    """Markdown of each page from one export with page-break marks (linear in the document).

    docling marks a break where the page changes between items, so a page without items gets
    no part: such pages get empty text. Where the parts still do not line up, fall back to one
    export per page."""
    parts = [p.strip("\n") for p in doc.export_to_markdown(page_break_placeholder=_PAGE_BREAK).split(_PAGE_BREAK)]
    if len(parts) == n_pages:
        return parts
    with_items = sorted({prov.page_no for item, _ in doc.iterate_items() for prov in getattr(item, "prov", [])})
    if len(parts) == len(with_items):
        by_page = dict(zip(with_items, parts, strict=True))
        return [by_page.get(p, "") for p in range(1, n_pages + 1)]
    return [doc.export_to_markdown(page_no=p) for p in range(1, n_pages + 1)]
