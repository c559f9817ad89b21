"""Training data: a JSONL file, or a folder with train/valid/test JSONL files.

Each row is one of three formats, detected per row: chat (``messages``), ``prompt`` +
``completion``, or ``text``. Bad rows are reported by file and line number, all of them
counted, the first one shown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from localforge.backends.types import ROLES
from localforge.errors import ConfigError

SPLITS = ("train", "valid", "test")


@dataclass
class Example:
    format: str  # "chat", "completion", "text"
    messages: list[dict] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None


@dataclass
class Dataset:
    splits: dict[str, list[Example]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # split -> path

    @property
    def formats(self) -> dict[str, list[str]]:
        return {s: sorted({e.format for e in rows}) for s, rows in self.splits.items()}


def parse_row(row: object) -> Example:
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}] needs a role (system, user, assistant, tool) and string content")
        if msgs[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (what the model learns to say)")
        return Example("chat", messages=msgs)
    if "prompt" in row or "completion" in row:
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        return Example("completion", prompt=row["prompt"], completion=row["completion"])
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise ValueError("'text' must be a non-empty string")
        return Example("text", text=row["text"])
    raise ValueError("unknown row format: give 'messages', 'prompt' + 'completion', or 'text'")


def read_jsonl(path: Path, parse=parse_row) -> list:
    """Every row of ``path`` through ``parse`` (a ``ValueError`` there is that row's fault); the
    first bad row named by file and line, with how many more there are."""
    rows, errors = [], []
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(parse(json.loads(line)))
                except json.JSONDecodeError as exc:
                    errors.append(f"{path} line {n}: not valid JSON ({exc.msg})")
                except ValueError as exc:
                    errors.append(f"{path} line {n}: {exc}")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
    if errors:
        more = f" ({len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise ConfigError(errors[0] + more)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def load_data(data: str | Path, parse=parse_row) -> Dataset:
    """The rows of a JSONL file (the train split) or of a folder's train/valid/test files, each
    through ``parse``."""
    path = Path(data)
    ds = Dataset()
    if path.is_file():
        ds.splits["train"], ds.files["train"] = read_jsonl(path, parse), str(path)
    elif path.is_dir():
        for split in SPLITS:
            f = path / f"{split}.jsonl"
            if f.is_file():
                ds.splits[split], ds.files[split] = read_jsonl(f, parse), str(f)
        if "train" not in ds.splits:
            raise ConfigError(f"data folder {path} has no train.jsonl (it may also hold valid.jsonl and test.jsonl)")
    else:
        raise ConfigError(f"data '{data}' does not exist: give a JSONL file or a folder with train.jsonl")
    return ds


# -- GRPO: prompts with what the rewards compare against -------------------------------------------
@dataclass
class PromptRow:
    """A GRPO row: the conversation the model answers (a ``question`` or ``prompt`` as the user's
    turn, after an optional ``system``, or ``prompt`` as a list of messages) and the row's other
    fields, which the rewards read (``answer`` for exact_match)."""

    messages: list[dict]
    fields: dict
    format: str = "prompt"  # what the plan table shows beside SFT's chat, completion and text

    @property
    def text(self) -> str:
        """The last user turn: what a reward sees as the prompt."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), self.messages[-1]["content"])


def parse_prompt_row(row: object) -> PromptRow:
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    prompt = row.get("prompt", row.get("question"))
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("'system' must be a string")
    if isinstance(prompt, str) and prompt.strip():
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise ValueError(f"prompt[{i}] needs a role (system, user, assistant, tool) and string content")
        if prompt[-1]["role"] == "assistant":
            raise ValueError("the prompt's last message is the assistant's: GRPO samples that turn, leave it out")
        messages = prompt
    elif "messages" in row and "prompt" not in row and "question" not in row:
        raise ValueError("a GRPO row gives 'question' (or 'prompt') and 'answer', not 'messages'")
    else:
        raise ValueError("a GRPO row needs 'question' (or 'prompt'): a non-empty string or a list of messages")
    fields = {k: v for k, v in row.items() if k not in ("prompt", "system")}
    return PromptRow(messages, fields)


def load_prompts(data: str | Path, needs: set[str] = frozenset()) -> Dataset:
    """GRPO rows by split (train, valid, test), each row checked, and every field in ``needs``
    (what the rewards read) present: the first bad row named by file and line."""
    def parse(row: object) -> PromptRow:
        prompt = parse_prompt_row(row)
        missing = sorted(k for k in needs if k not in prompt.fields)
        if missing:
            raise ValueError(f"no '{missing[0]}' field, which the config's rewards read")
        return prompt

    return load_data(data, parse)
