"""Token-aware chunks with overlap that keep their heading context and never split a table row.

Text is cut into blocks (paragraphs; a Markdown table's rows stay whole). Blocks are packed into
chunks of at most ``size`` tokens; the next chunk starts with the last ``overlap`` tokens' worth
of blocks. Each chunk knows its span in the document text (for grounding) and the headings
above it (given to the model as context, not part of the span).

A block larger than a chunk (a text without blank lines, one huge line, a giant table row) is
split: by sentence first, and a sentence still larger than a chunk by tokens, in pieces of about
the overlap so that neighbouring chunks still share context. Every piece keeps its offsets, so
grounding spans stay right. No chunk is ever larger than ``size`` tokens.

Tokens are estimated without any one tokenizer: a word of up to 10 characters counts one, a
longer one one per 4 characters, a word beyond ASCII one per 2, a punctuation mark, a digit and a
CJK character one each. Over
the docling corpus this is 1.2 times below SmolLM2's BPE count, and it stays within a small
factor of it for text without spaces (one 5 MB line, base64, digits); see benchmarks/chunking.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# CJK ideographs, kana and hangul are about a token each, and so is each digit; a word of up to
# 10 characters is one token, a longer one (an identifier, a URL, base64) one per 4 characters,
# and a word with letters beyond ASCII one per 2 characters.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|\d+|[^\W\d{_CJK}]+|[^\w\s]")
_WORD = 10  # characters a word may have and still count as one token
_CHARS = 4  # characters per token in longer words
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
# The end of a sentence: terminal punctuation, closing quotes or brackets, then space; or a line break.
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?:\s+|$)|\n")


def _weight(match: re.Match) -> int:
    word = match.group(0)
    n = len(word)
    if word[0].isdigit():
        return n
    if not word.isascii():  # other scripts (Arabic, Cyrillic, Hangul, accents): BPE splits them finer
        return -(-n // 2)
    return 1 if n <= _WORD else -(-n // _CHARS)


def count_tokens(text: str) -> int:
    return sum(_weight(m) for m in _TOKEN.finditer(text))


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # span in the document text
    end: int
    headings: tuple[str, ...]  # the heading path above the chunk

    def body(self, text: str) -> str:
        return text[self.start : self.end]

    def prompt_text(self, text: str) -> str:
        context = " > ".join(self.headings)
        return (f"[Section: {context}]\n\n" if context else "") + self.body(text)


@dataclass(frozen=True)
class _Block:
    start: int
    end: int
    tokens: int
    headings: tuple[str, ...]
    table: bool


def _blocks(text: str) -> list[_Block]:
    """Paragraphs and table rows with their offsets; table rows are separate blocks so that a
    big table splits between rows, never inside one."""
    blocks: list[_Block] = []
    headings: list[tuple[int, str]] = []
    for m in re.finditer(r"[^\n]+(?:\n(?!\n)[^\n]+)*", text):  # runs of non-blank lines
        para, base = m.group(0), m.start()
        if not para.strip():
            continue  # only spaces: nothing to ask about
        lines = para.split("\n")
        if all(line.lstrip().startswith("|") for line in lines):
            offset = base
            for line in lines:
                blocks.append(_Block(offset, offset + len(line), count_tokens(line),
                                     tuple(h for _, h in headings), True))
                offset += len(line) + 1
            continue
        h = _HEADING.match(lines[0])
        if h:
            level = len(h.group(1))
            headings = [(lv, t) for lv, t in headings if lv < level] + [(level, h.group(2).strip())]
        blocks.append(_Block(base, m.end(), count_tokens(para), tuple(t for _, t in headings), False))
    return blocks


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    """``start, end`` without the whitespace at either end."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _windows(text: str, start: int, end: int, piece: int) -> list[tuple[int, int, int]]:
    """``text[start:end]`` cut between tokens into pieces of at most ``piece`` tokens, as
    (start, end, tokens); a single word heavier than a piece is cut inside itself."""
    out: list[tuple[int, int, int]] = []
    lo, tokens, last = start, 0, start
    for m in _TOKEN.finditer(text, start, end):
        w = _weight(m)
        if tokens and tokens + w > piece:  # close the piece before this token
            out.append((lo, last, tokens))
            lo, tokens = m.start(), 0
        if w > piece:  # one long word: cut it into pieces of ``piece`` tokens' worth of characters
            step = piece if m.group(0)[0].isdigit() else piece * _CHARS
            for s in range(m.start(), m.end(), step):
                e = min(s + step, m.end())
                out.append((s, e, count_tokens(text[s:e])))
            lo, tokens = m.end(), 0
        else:
            tokens += w
        last = m.end()
    if tokens:
        out.append((lo, last, tokens))
    return [(s, e, t) for s, e, t in out if e > s]


def _split(text: str, block: _Block, size: int, piece: int) -> list[_Block]:
    """A block larger than a chunk as sentences, and sentences larger than a chunk as pieces of
    ``piece`` tokens; every part keeps its offsets in ``text``."""
    parts: list[tuple[int, int, int]] = []
    lo = block.start
    bounds = [m.end() for m in _SENTENCE_END.finditer(text, block.start, block.end)]
    for hi in [*bounds, block.end]:
        s, e = _trimmed(text, lo, hi)
        lo = hi
        if e <= s:
            continue
        tokens = count_tokens(text[s:e])
        if tokens <= size:
            parts.append((s, e, tokens))
        else:
            parts.extend(_windows(text, s, e, piece))
    return [_Block(s, e, t, block.headings, block.table) for s, e, t in parts if t > 0 or e > s]


def chunk_text(text: str, size: int = 512, overlap: int = 64) -> list[Chunk]:
    if size < 16:
        raise ValueError("chunk size must be at least 16 tokens")
    overlap = max(0, min(overlap, size // 2))
    piece = max(overlap, size // 8)
    blocks: list[_Block] = []
    for b in _blocks(text):
        blocks.extend(_split(text, b, size, piece) if b.tokens > size else [b])
    chunks: list[Chunk] = []
    i = 0
    while i < len(blocks):
        j, tokens = i, 0
        while j < len(blocks) and (j == i or tokens + blocks[j].tokens <= size):
            tokens += blocks[j].tokens
            j += 1
        first = blocks[i]
        chunks.append(Chunk(len(chunks), first.start, blocks[j - 1].end, first.headings))
        if j >= len(blocks):
            break
        # step back over the last blocks that fit in the overlap, but always move forward: the
        # next chunk must still reach the first block this one left out
        back, k = 0, j
        while k - 1 > i and back + blocks[k - 1].tokens <= min(overlap, size - blocks[j].tokens):
            k -= 1
            back += blocks[k].tokens
        i = k
    return chunks
