"""Chunking: localforge's chunker against docling-core's HybridChunker, on the docling corpus.

Both cut the same documents into chunks of at most 384 tokens (HybridChunker counts with the
bundled model's own tokenizer, offline; localforge with its tokenizer-free estimate). Reported
per chunker: chunks, seconds, the largest chunk in real SmolLM2 tokens, and the share of chunks
whose text can be found verbatim in the document's Markdown, which grounding needs (a value's
span is an offset into that text). Also the estimate's drift on text without spaces.

HybridChunker needs docling-core's [chunking] extra (semchunk, tree-sitter and four grammars; in `.[bench]`);
run with them importable, e.g. ``pip install 'docling-core[chunking]'`` in a scratch venv.

    python benchmarks/chunking.py [--out benchmarks/results/chunking.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "corpus" / "docling"
SIZE = 384


def documents():
    """(name, DoclingDocument, the Markdown localforge chunks) for the corpus files docling reads."""
    from docling.datamodel.base_models import InputFormat
    from docling.datamodel.pipeline_options import NativePdfPipelineOptions
    from docling.document_converter import DocumentConverter, PdfFormatOption
    from docling.pipeline.native_pdf_pipeline import NativePdfPipeline

    conv = DocumentConverter(format_options={InputFormat.PDF: PdfFormatOption(
        pipeline_cls=NativePdfPipeline, pipeline_options=NativePdfPipelineOptions())})
    for p in sorted(CORPUS.rglob("*")):
        if p.suffix.lower() in (".md", ".html", ".pdf", ".docx") and p.stat().st_size < 2_000_000:
            try:
                doc = conv.convert(str(p)).document
            except Exception:  # noqa: BLE001 - a corpus file docling cannot read is not a case
                continue
            yield str(p.relative_to(CORPUS)), doc, doc.export_to_markdown()


def main() -> None:
    from docling_core.transforms.chunker.hybrid_chunker import HybridChunker
    from docling_core.transforms.chunker.tokenizer.huggingface import HuggingFaceTokenizer
    from transformers import AutoTokenizer

    from localforge.backends import ensure_hf
    from localforge.extract.chunking import chunk_text
    from localforge.models import resolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/chunking.json")
    args = ap.parse_args()
    hf = AutoTokenizer.from_pretrained(ensure_hf(resolve("smollm2-135m")))  # local files only

    def real(text: str) -> int:
        return len(hf(text, add_special_tokens=False)["input_ids"])

    hybrid = HybridChunker(tokenizer=HuggingFaceTokenizer(tokenizer=hf, max_tokens=SIZE), merge_peers=True)
    docs = list(documents())
    rows = {"localforge": {"chunks": 0, "seconds": 0.0, "max_real_tokens": 0, "over_size": 0, "found_verbatim": 0},
            "HybridChunker": {"chunks": 0, "seconds": 0.0, "max_real_tokens": 0, "over_size": 0, "found_verbatim": 0}}
    for _name, doc, md in docs:
        t0 = time.perf_counter()
        ours = [c.body(md) for c in chunk_text(md, SIZE, 48)]
        rows["localforge"]["seconds"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = [hybrid.contextualize(c) for c in hybrid.chunk(doc)]
        rows["HybridChunker"]["seconds"] += time.perf_counter() - t0
        raw = [c.text for c in hybrid.chunk(doc)]
        for key, texts, plain in (("localforge", ours, ours), ("HybridChunker", theirs, raw)):
            r = rows[key]
            r["chunks"] += len(texts)
            sizes = [real(t) for t in texts]
            r["max_real_tokens"] = max([r["max_real_tokens"], *sizes])
            r["over_size"] += sum(s > SIZE * 1.5 for s in sizes)
            r["found_verbatim"] += sum(t in md for t in plain)
    for r in rows.values():
        r["found_verbatim_share"] = round(r["found_verbatim"] / max(1, r["chunks"]), 3)
        r["seconds"] = round(r["seconds"], 3)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"chunking {len(docs)} corpus documents at {SIZE} tokens")
    for col in ("", "chunks", "seconds", "largest (SmolLM2 tokens)", f"chunks > {int(SIZE * 1.5)} tokens",
                "text found in the Markdown (offsets)"):
        table.add_column(col)
    for name, r in rows.items():
        table.add_row(name, str(r["chunks"]), f"{r['seconds']:.2f}", str(r["max_real_tokens"]), str(r["over_size"]),
                      f"{r['found_verbatim_share']:.0%}")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"documents": len(docs), "size": SIZE, **rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
