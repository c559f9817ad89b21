"""Token-aware chunks with overlap that keep their heading context and never split a table row.

Text is cut into blocks (paragraphs; a Markdown table's rows stay whole). Blocks are packed into
chunks of at most ``size`` tokens; the next chunk starts with the last ``overlap`` tokens' worth
of blocks. Each chunk knows its span in the document text (for grounding) and the headings
above it (given to the model as context, not part of the span). Tokens are estimated as words
and punctuation marks, close to BPE counts for prose and independent of any one tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"\w+|[^\w\s]")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


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


def chunk_text(text: str, size: int = 512, overlap: int = 64) -> list[Chunk]:
    if size < 16:
        raise ValueError("chunk size must be at least 16 tokens")
    overlap = max(0, min(overlap, size // 2))
    blocks = _blocks(text)
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
        # step back over the last blocks that fit in the overlap, but always move forward
        back, k = 0, j
        while k - 1 > i and back + blocks[k - 1].tokens <= overlap:
            k -= 1
            back += blocks[k].tokens
        i = k
    return chunks
