"""Chunking, schemas, grounding and conversion, on real corpus files."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from localforge.errors import ConfigError
from localforge.extract.chunking import chunk_text, count_tokens
from localforge.extract.convert import Converter, DocumentError
from localforge.extract.grounding import _normalized, ground, ground_record
from localforge.extract.schema import load_schema, parse_fields
from tests.helpers import CORPUS, needs_corpus

# --- chunking ----------------------------------------------------------------------------------


def test_chunks_cover_the_text_respect_size_and_keep_headings():
    text = "# Radio\n\n" + "\n\n".join(f"Paragraph {i} " + "word " * 30 for i in range(12)) + \
        "\n\n## Bands\n\n| band | MHz |\n|---|---|\n" + "\n".join(f"| b{i} | {900 + i} |" for i in range(40))
    chunks = chunk_text(text, size=80, overlap=40)
    assert any(b.start < a.end for a, b in zip(chunks, chunks[1:], strict=False))  # some overlap
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start > a.start  # always forward
        assert text[a.end:b.start].strip() == ""  # nothing skipped (overlap is in whole blocks)
    for c in chunks:
        body = c.body(text)
        assert count_tokens(body) <= 80 or "\n" not in body.strip()  # only a single block may exceed
        for line in body.splitlines():
            if line.startswith("|"):
                assert line.endswith("|")  # a table row is never cut
    assert chunks[-1].headings == ("Radio", "Bands")
    assert chunks[-1].prompt_text(text).startswith("[Section: Radio > Bands]")


@given(st.lists(st.text(alphabet="abc de\n|", min_size=1, max_size=60), min_size=1, max_size=30))
def test_chunk_spans_always_lie_in_the_text(parts):
    text = "\n\n".join(parts)
    for c in chunk_text(text, size=16, overlap=4):
        assert 0 <= c.start < c.end <= len(text)


# --- schemas -----------------------------------------------------------------------------------


def test_inline_fields():
    s = parse_fields("title:str, release:str, frequency_mhz:float, tags:list[str]")
    assert s["properties"]["frequency_mhz"] == {"type": "number"}
    assert s["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert s["required"] == ["title", "release", "frequency_mhz", "tags"]


@pytest.mark.parametrize("spec, match", [
    ("title:text", "field 'title' has unknown type 'text'"),
    ("my title:str", "'my title' is not a valid field name"),
    (" , ", "--fields is empty"),
])
def test_bad_fields(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_fields(spec)


def test_schema_file_and_module(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}}))
    assert load_schema(str(f))["properties"] == {"a": {"type": "string"}}
    assert "properties" in load_schema("localforge.hardware:Accelerator")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match=r"--schema .*bad.json: not valid JSON \(line 1"):
        load_schema(str(bad))
    with pytest.raises(ConfigError, match="give exactly one of --schema"):
        load_schema(None, None)
    with pytest.raises(ConfigError, match="no such file"):
        load_schema(str(tmp_path / "missing.json"))


# --- grounding -----------------------------------------------------------------------------------

TEXT = "The Nokia 3310 was released in\nSeptember 2000. It weighs 133 g and cost 2,400 EUR at 900.5 MHz."


@pytest.mark.parametrize("value, status, source", [
    ("Nokia 3310", "exact", "Nokia 3310"),
    ("september 2000", "normalized", "September 2000"),
    ("released in September", "normalized", "released in\nSeptember"),
    ("Nokai 3310 was", "fuzzy", "Nokia 3310 was"),
    (133, "exact", "133"),
    (2400, "exact", "2,400"),
    (900.5, "exact", "900.5"),
])
def test_values_are_found_at_their_span(value, status, source):
    g = ground(value, TEXT)
    assert g.status == status
    assert TEXT[g.start:g.end] == source


@pytest.mark.parametrize("value", ["Motorola", 13, 3, ""])
def test_values_not_in_the_text_are_ungrounded(value):
    g = ground(value, TEXT)
    assert g.status == "ungrounded" and g.start is None


def test_record_grounding_walks_lists_and_pages():
    pages = lambda offset: 1 if offset < 40 else 2  # noqa: E731
    out = ground_record({"phone": "Nokia 3310", "facts": ["133 g", "Android"]}, TEXT, (0, len(TEXT)), pages)
    assert out["phone"]["page"] == 1 and out["facts[0]"]["page"] == 2
    assert out["facts[1]"]["status"] == "ungrounded"


@given(st.text(min_size=1, max_size=80))
def test_normalized_offsets_point_into_the_source(text):
    norm, index = _normalized(text)
    assert len(norm) == len(index)
    for ch, i in zip(norm, index, strict=True):
        assert ch == " " and text[i].isspace() or ch == text[i].lower()


# --- conversion ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converter(tmp_path_factory):
    return Converter(cache_dir=tmp_path_factory.mktemp("conv"))


@needs_corpus
@pytest.mark.parametrize("rel", ["pdf/multi_page.pdf", "docx/word_sample.docx", "html/table_01.html",
                                 "md/mixed.md", "pdf/2305.03393v1-pg9.pdf"])
def test_formats_convert(converter, rel):
    doc = converter.convert(CORPUS / rel)
    assert doc.text.strip() and len(doc.sha256) == 64
    if rel.endswith(".pdf"):
        assert doc.mode == "docling-native" and doc.pages
        assert doc.pages[0][0] == 0 and doc.pages[-1][1] == len(doc.text)
    else:
        assert doc.mode == "docling"


@needs_corpus
def test_pdf_pages_are_where_the_page_text_is(converter):
    doc = converter.convert(CORPUS / "pdf/multi_page.pdf")
    assert [p for _, _, p in doc.pages] == list(range(1, len(doc.pages) + 1))
    start, end, _ = doc.pages[1]
    assert doc.page_at(start) == 2 and doc.page_at(end - 1) == 2


@needs_corpus
def test_conversion_is_cached_by_content(converter, tmp_path):
    src = tmp_path / "copy.md"
    src.write_bytes((CORPUS / "md/duck.md").read_bytes())
    first = converter.convert(src)
    entries = set(converter.cache_dir.iterdir())
    again = converter.convert(src)
    assert again.text == first.text and set(converter.cache_dir.iterdir()) == entries


@pytest.mark.parametrize("name, content, match", [
    ("corrupt.pdf", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog", "cannot be read"),
    ("empty.pdf", b"", "empty file"),
    ("garbage.pdf", bytes(range(256)) * 40, "cannot be read"),
    ("notes.xyz", b"hello", "unsupported file type '.xyz'"),
])
def test_bad_files_are_one_line_errors(converter, tmp_path, name, content, match):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DocumentError, match=match) as info:
        converter.convert(f)
    assert str(info.value).startswith(str(f)) and "\n" not in str(info.value)


def test_non_utf8_text_is_read_and_says_so(converter, tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("Café crème at 25 °C".encode("latin-1"))
    doc = converter.convert(f)
    assert doc.text == "Café crème at 25 °C" and "not UTF-8" in doc.mode


# --- routing ------------------------------------------------------------------------------------


def test_routing_by_complexity():
    from localforge.extract.routing import measures, pick

    table = "| a | b |\n|---|---|\n| 1 | 2 |\n\n"
    assert measures(table * 3, 2) == {"chars": len(table) * 3, "tables": 3, "pages": 2}
    assert pick("small", None, "x" * 10**6, 99) == "small"
    assert pick("small,large", None, "short text", 1) == "small"
    assert pick("small,large", None, table * 3, 1) == "large"  # default rule: tables>2
    assert pick("small,large", "pages>10", "x" * 10**6, 11) == "large"
    with pytest.raises(ConfigError, match="--route: cannot read 'words>3'"):
        pick("small,large", "words>3", "", 1)
    with pytest.raises(ConfigError, match="give one model, or a small and a large one"):
        pick("a,b,c", None, "", 1)


# --- settings: one object, from a file, key=value and flags ----------------------------------------


def test_settings_from_a_config_file_with_overrides(tmp_path):
    from localforge.extract.pipeline import load_extract_settings

    (tmp_path / "record.json").write_text(json.dumps(parse_fields("name:str, detail:str")))
    (tmp_path / "shots.json").write_text(json.dumps([{"text": "a", "records": []}]))
    cfg = tmp_path / "extract.yaml"
    cfg.write_text("schema: record.json\nexamples: shots.json\nbackend: openai\nmodel: m\n"
                   "base_url: http://x\nchunk_size: 300\n")
    settings = load_extract_settings(cfg, ["chunk_size=256"], {"passes": ("--passes", None)})
    assert settings.record_schema == parse_fields("name:str, detail:str") and settings.passes == 1
    assert settings.examples == [{"text": "a", "records": []}] and settings.chunk_size == 256
    # the records of an earlier version's run are still recognised as done: the digest is unchanged
    assert settings.digest() == "cef2ab636f078344"
    (tmp_path / "other.json").write_text(json.dumps(parse_fields("title:str")))
    flagged = load_extract_settings(cfg, [], {"schema": ("--schema", str(tmp_path / "other.json"))})
    assert flagged.record_schema == parse_fields("title:str")  # the flag wins over the file's schema
    inline = load_extract_settings(None, ["fields=name:str"])
    assert inline.record_schema == parse_fields("name:str") and inline.digest() == "18cb5b4b221060dd"


@pytest.mark.parametrize("args, code, message", [
    (["--fields", "a:str", "--passes", "0"], 2, "error: --passes: input should be greater than or equal to 1, got 0"),
    (["--fields", "a:str", "chunk_size=8"], 1, "error: config key 'chunk_size': input should be greater than or equal to 16"),
    ([], 1, "error: give exactly one of --schema (a JSON Schema file or module:Class) and --fields"),
    (["--fields", "a:str", "--model", "a,b,c"], 1, "error: --model 'a,b,c': give one model, or a small and a large"),
    (["--fields", "a:str", "--backend", "nope"], 2, "unknown backend 'nope': choose one of auto, mlx, torch"),
    (["--config", "missing.yaml"], 1, "error: missing.yaml: no such config file"),
    (["--fields", "a:str", "--backend", "torch", "--base-url", "http://x"], 2,
     "error: --base-url: a server URL is for server backends; backend 'torch' runs in-process"),
    (["--fields", "a:str", "backend=openai", "base_url=ht!tp://x"], 1,
     "error: override 'base_url=ht!tp://x': config key 'base_url': 'ht!tp://x' is not a server URL"),
])
def test_bad_settings_fail_in_one_line_before_any_work(tmp_path, args, code, message):
    from tests.helpers import run_cli

    doc = tmp_path / "doc.md"
    doc.write_text("# A radio\n\nThe Nord 7 is made by Clavia.\n")
    out = tmp_path / "out.jsonl"
    res = run_cli("extract", str(doc), "-o", str(out), *args, env={"LOCALFORGE_CACHE": str(tmp_path / "c")})
    assert res.returncode == code, res.stderr
    assert res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1, res.stderr
    assert message.removeprefix("error: ") in res.stderr, res.stderr  # an override's error may name it first
    assert not out.exists() and not (tmp_path / "c").exists()  # nothing was done
