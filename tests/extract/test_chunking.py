"""Chunks are never larger than asked: a paragraph, a line or a word larger than a chunk is split
(by sentence, then by tokens), and every chunk keeps its offsets in the document text."""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localforge.extract.chunking import chunk_text, count_tokens
from localforge.extract.grounding import ground
from tests.helpers import CORPUS, needs_corpus


def covered(text: str, chunks) -> bool:
    """Every non-blank character of ``text`` lies in some chunk."""
    mask = bytearray(len(text))
    for c in chunks:
        mask[c.start:c.end] = b"\1" * (c.end - c.start)
    return all(mask[i] or text[i].isspace() for i in range(len(text)))


def check(text: str, size: int, overlap: int):
    chunks = chunk_text(text, size, overlap)
    assert chunks, "no chunks"
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start > a.start and b.end > a.end  # always forward
    for c in chunks:
        assert 0 <= c.start < c.end <= len(text)
        assert count_tokens(c.body(text)) <= size, (c, count_tokens(c.body(text)))
    assert covered(text, chunks)
    return chunks


# a text of 29 KB without a blank line: one paragraph, as a converted web page or log can be
SENTENCES = [f"Record {i}: the Nokia {3000 + i} was released in {1990 + i % 30} and weighs {100 + i} g."
             for i in range(450)]
ONE_PARAGRAPH = " ".join(SENTENCES)


def test_a_paragraph_larger_than_a_chunk_is_split_by_sentence():
    assert len(ONE_PARAGRAPH) > 29_000
    chunks = check(ONE_PARAGRAPH, 384, 48)
    assert len(chunks) > 10
    for c in chunks:  # cut between sentences, never inside one
        body = c.body(ONE_PARAGRAPH)
        assert body.startswith("Record ") and body.endswith(" g."), body[:40] + " ... " + body[-40:]
    # neighbours share context (the overlap), whole sentences of it
    assert sum(b.start < a.end for a, b in zip(chunks, chunks[1:], strict=False)) >= len(chunks) - 2


def test_a_value_in_a_split_paragraph_is_grounded_at_its_offsets():
    chunks = chunk_text(ONE_PARAGRAPH, 128, 16)
    target = SENTENCES[300]
    where = ONE_PARAGRAPH.index(target)
    chunk = next(c for c in chunks if c.start <= where and where + len(target) <= c.end)
    assert target in chunk.body(ONE_PARAGRAPH)
    g = ground("Nokia 3300", ONE_PARAGRAPH, (chunk.start, chunk.end))
    assert g.status == "exact" and ONE_PARAGRAPH[g.start:g.end] == "Nokia 3300"
    assert chunk.start <= g.start < chunk.end


@pytest.mark.parametrize("kind", ["letters", "digits", "base64", "cjk", "words-no-stop"])
def test_one_huge_line_is_split_by_tokens(kind):
    rng = random.Random(0)
    text = {
        "letters": "x" * 1_000_000,
        "digits": "".join(rng.choice("0123456789") for _ in range(200_000)),
        "base64": base64.b64encode(rng.randbytes(300_000)).decode(),
        "cjk": "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(50_000)),
        "words-no-stop": " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(100_000)),
    }[kind]
    chunks = check(text, 256, 32)
    assert len(chunks) >= count_tokens(text) // 256


def test_a_five_megabyte_line():
    text = ("lorem ipsum dolor sit amet, " * 180_000)[:5_000_000]
    chunks = check(text, 384, 48)
    assert len(chunks) > 1000


def test_a_table_row_larger_than_a_chunk_is_split_and_other_rows_stay_whole():
    row = "| " + " | ".join(f"cell {i} with some words" for i in range(200)) + " |"
    text = "| a | b |\n|---|---|\n| 1 | 2 |\n" + row + "\n| 3 | 4 |"
    chunks = check(text, 64, 8)
    bodies = [c.body(text) for c in chunks]
    assert any("| 1 | 2 |" in b for b in bodies) and any(b.endswith("| 3 | 4 |") for b in bodies)


def test_paragraphs_that_fit_are_chunked_as_before():
    """Blocks that fit are never split: the chunks of an ordinary document do not change."""
    text = "\n\n".join(f"Paragraph {i}. " + " ".join(["It has words."] * 10) for i in range(20))
    for c in chunk_text(text, 100, 20):
        body = c.body(text)
        assert body.startswith("Paragraph") and body.endswith("words.")


@needs_corpus
@pytest.mark.parametrize("rel", ["pdf-groundtruth/right_to_left_01.md", "pdf-groundtruth/normal_4pages.md",
                                 "md/mixed.md", "html/example_03.html"])
def test_corpus_documents(rel):
    text = (CORPUS / rel).read_text(encoding="utf-8", errors="replace")
    check(text, 64, 16)
    check(text.replace("\n", " "), 64, 16)  # the same document without a single line break


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab cé.!?\n|#1x")) | st.characters(), min_size=1, max_size=3000),
       st.integers(16, 64), st.integers(0, 40))
def test_any_text_chunks_within_size_with_spans_in_the_text(text, size, overlap):
    if not text.strip():
        assert chunk_text(text, size, overlap) == []
        return
    if count_tokens(text) == 0:  # only blank-looking characters the estimator does not count
        return
    check(text, size, overlap)
