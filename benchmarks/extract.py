"""Extraction: localforge against LangExtract 1.7, same documents, server and model, one run.

Both read the same converted text of a fixed set of corpus documents and send it to the same
llama.cpp server (SmolLM2-135M, greedy). Reported: documents/s, records, share of values
grounded (LangExtract: extractions aligned to a char interval; localforge: values located),
JSON failures (LangExtract: documents whose output failed to parse; localforge: rejected
chunks). Also conversion pages/s through localforge against docling called directly.

LangExtract needs ``response_format={"type": "json_object", "schema": ...}`` against llama.cpp
(its default ``json_schema`` request is rejected with HTTP 500).

    pip install 'langextract[openai]==1.7.1'; python benchmarks/extract.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.servers
CORPUS = ROOT.parent / "shared" / "corpus" / "docling"

DOCS = ["md/duck.md", "md/mixed.md", "html/table_01.html", "html/example_03.html",
        "pdf/2305.03393v1-pg9.pdf", "docx/word_sample.docx"]
FIELDS = "name:str, detail:str"
PROMPT = "Extract named things (people, organisations, products, places, concepts) with a short detail quoted from the text."
EXAMPLE_TEXT = "The Eiffel Tower, designed by Gustave Eiffel, opened in Paris in 1889."
EXAMPLE = [{"name": "Eiffel Tower", "detail": "opened in Paris in 1889"},
           {"name": "Gustave Eiffel", "detail": "designed by Gustave Eiffel"}]


def texts() -> dict[str, str]:
    from localforge.extract.convert import Converter

    conv = Converter(pdf_mode="native")
    return {rel: conv.convert(CORPUS / rel).text for rel in DOCS}


def run_localforge(url: str, model: str, docs: dict[str, str], workdir: Path, examples: bool = True) -> dict:
    from localforge.extract.pipeline import ExtractSettings, run
    from localforge.extract.schema import parse_fields

    folder = workdir / f"lf-docs-{examples}"
    folder.mkdir()
    for rel, text in docs.items():  # the same converted text LangExtract gets
        (folder / (Path(rel).stem + ".md")).write_text(text, encoding="utf-8")
    settings = ExtractSettings(schema=parse_fields(FIELDS), backend="openai", model=model, base_url=url,
                               cache=False, chunk_size=256, max_tokens=256, attempts=2,
                               examples=[{"text": EXAMPLE_TEXT, "records": EXAMPLE}] if examples else [])
    t0 = time.perf_counter()
    s = run([folder], workdir / f"lf-{examples}.jsonl", settings)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "documents_per_s": round(len(docs) / seconds, 3),
            "records": s.records, "values": s.values, "grounded_share": round(s.grounded_share, 3),
            "json_failures": s.rejects, "failed_documents": len(s.failed)}


def run_langextract(url: str, model: str, docs: dict[str, str]) -> dict:
    import langextract as lx

    examples = [lx.data.ExampleData(text=EXAMPLE_TEXT, extractions=[
        lx.data.Extraction(extraction_class="name", extraction_text=e["name"],
                           attributes={"detail": e["detail"]}) for e in EXAMPLE])]
    schema = {"type": "object", "properties": {"extractions": {"type": "array", "items": {"type": "object"}}},
              "required": ["extractions"]}
    config = lx.factory.ModelConfig(model_id=model, provider="OpenAILanguageModel", provider_kwargs={
        "base_url": url, "api_key": "not-needed", "response_format": {"type": "json_object", "schema": schema}})
    import logging

    class Omitted(logging.Handler):  # LangExtract logs (and drops) chunks it cannot parse
        count = 0

        def emit(self, record):
            Omitted.count += "Chunk omitted" in record.getMessage()

    logging.getLogger("absl").addHandler(Omitted())
    records = grounded = failures = 0
    t0 = time.perf_counter()
    for text in docs.values():
        try:
            result = lx.extract(text_or_documents=text, prompt_description=PROMPT, examples=examples,
                                config=config, use_schema_constraints=False, fence_output=False,
                                temperature=0.0, max_char_buffer=1000, max_workers=4, show_progress=False)
        except Exception as exc:  # noqa: BLE001 - LangExtract raises on unparseable output
            failures += 1
            print(f"  langextract failed on a document: {type(exc).__name__}: {str(exc)[:100]}", file=sys.stderr)
            continue
        for e in result.extractions or []:
            records += 1
            grounded += e.char_interval is not None and e.alignment_status is not None
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "documents_per_s": round(len(docs) / seconds, 3), "records": records,
            "values": records, "grounded_share": round(grounded / records, 3) if records else 0.0,
            "json_failures": failures + Omitted.count, "failed_documents": failures}


def conversion(repeats: int = 3) -> dict:
    """Pages/s over the corpus PDFs: localforge's Converter (no cache) vs docling directly."""
    from docling.datamodel.base_models import InputFormat
    from docling.datamodel.pipeline_options import NativePdfPipelineOptions
    from docling.document_converter import DocumentConverter, PdfFormatOption
    from docling.pipeline.native_pdf_pipeline import NativePdfPipeline

    from localforge.extract.convert import Converter

    pdfs = sorted((CORPUS / "pdf").glob("*.pdf"))
    raw = DocumentConverter(format_options={InputFormat.PDF: PdfFormatOption(
        pipeline_cls=NativePdfPipeline, pipeline_options=NativePdfPipelineOptions())})
    pages = sum(raw.convert(str(p)).document.num_pages() for p in pdfs)  # also warms both up
    ours = Converter(pdf_mode="native")
    raw_t, ours_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in pdfs:
            raw.convert(str(p)).document.export_to_markdown()
        raw_t.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            ours.cache_dir = Path(tmp)  # an empty cache: every file is converted (and cached)
            if not ours_t:
                ours.convert(pdfs[0])  # warm up, as docling was above
                ours.cache_dir = Path(tmp) / "fresh"
            t0 = time.perf_counter()
            for p in pdfs:
                ours.convert(p)
            ours_t.append(time.perf_counter() - t0)
    r, o = statistics.median(raw_t), statistics.median(ours_t)
    return {"pdfs": len(pdfs), "pages": pages, "docling_pages_per_s": round(pages / r, 1),
            "localforge_pages_per_s": round(pages / o, 1), "ratio": round(r / o, 3)}


def main() -> None:
    from localforge.models import resolve
    from tests.servers import ALIAS, LlamaServer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/extract.json")
    args = ap.parse_args()

    docs = texts()
    print("conversion ...", file=sys.stderr, flush=True)
    conv = conversion()
    server = LlamaServer(resolve("smollm2-135m").gguf_path).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print("localforge ...", file=sys.stderr, flush=True)
            ours = run_localforge(server.url, ALIAS, docs, Path(tmp))
            bare = run_localforge(server.url, ALIAS, docs, Path(tmp), examples=False)
        print("langextract ...", file=sys.stderr, flush=True)
        theirs = run_langextract(server.url, ALIAS, docs)
    finally:
        server.stop()

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"extract: {len(docs)} corpus documents, llama.cpp server, SmolLM2-135M")
    for col in ("", "documents/s", "records", "grounded share", "JSON failures", "seconds"):
        table.add_column(col)
    for name, r in (("localforge", ours), ("localforge, no example", bare), ("LangExtract 1.7", theirs)):
        table.add_row(name, f"{r['documents_per_s']:.3f}", str(r["records"]), f"{r['grounded_share']:.0%}",
                      str(r["json_failures"]), f"{r['seconds']:.1f}")
    console = Console()
    console.print(table)
    speedup = ours["documents_per_s"] / theirs["documents_per_s"] if theirs["documents_per_s"] else float("inf")
    console.print(f"documents/s ratio localforge/LangExtract: {speedup:.2f} (goal >= 2)")
    console.print(f"conversion: {conv['localforge_pages_per_s']} pages/s vs docling {conv['docling_pages_per_s']} "
                  f"pages/s ({conv['pages']} pages, {conv['pdfs']} PDFs): ratio {conv['ratio']} (goal >= 0.95)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"documents": DOCS, "localforge": ours, "localforge_no_example": bare, "langextract": theirs,
                               "speedup": round(speedup, 2), "conversion": conv}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
