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


def read_jsonl(path: Path) -> list[Example]:
    rows, errors = [], []
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(parse_row(json.loads(line)))
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


def load_data(data: str | Path) -> Dataset:
    path = Path(data)
    ds = Dataset()
    if path.is_file():
        ds.splits["train"], ds.files["train"] = read_jsonl(path), str(path)
    elif path.is_dir():
        for split in SPLITS:
            f = path / f"{split}.jsonl"
            if f.is_file():
                ds.splits[split], ds.files[split] = read_jsonl(f), str(f)
        if "train" not in ds.splits:
            raise ConfigError(f"data folder {path} has no train.jsonl (it may also hold valid.jsonl and test.jsonl)")
    else:
        raise ConfigError(f"data '{data}' does not exist: give a JSONL file or a folder with train.jsonl")
    return ds
