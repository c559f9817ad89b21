"""Where a pipeline run keeps each stage's files, and their content hashes."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from localforge.files import sha256_file


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def settings(self) -> Path:
        return self.root / "pipeline.yaml"  # the pipeline as run: every section with its defaults

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def records(self) -> Path:
        return self.root / "records.jsonl"

    @property
    def review(self) -> Path:
        return self.root / "review.html"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.jsonl"

    @property
    def dcr_input(self) -> Path:
        return self.root / "dcr-input.jsonl"

    @property
    def improved(self) -> Path:
        return self.root / "improved.jsonl"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    def split(self, name: str) -> Path:
        return self.dataset / f"{name}.jsonl"

    @property
    def finetune_config(self) -> Path:
        return self.root / "finetune.yaml"

    @property
    def run(self) -> Path:
        return self.root / "finetune"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def answers(self) -> Path:
        return self.eval / "answers.jsonl"

    @property
    def report(self) -> Path:
        return self.eval / "eval.json"


    def names(self, paths: list[Path]) -> dict[str, Path]:
        """A name for each path that survives moving the project: relative to the run folder when
        inside it, else relative to the deepest folder the outside ones share (the documents)."""
        outside = [p for p in paths if not p.is_relative_to(self.root)]
        base = Path(os.path.commonpath(outside)) if outside else None
        if base is not None and len(outside) == 1:
            base = base.parent
        return {(p.relative_to(self.root) if p.is_relative_to(self.root) else p.relative_to(base)).as_posix(): p
                for p in paths}


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file the run wrote (blank lines skipped); none when it is not there."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def digest(path: Path) -> str | None:
    """sha256 of a file, or of a folder's files (names and contents); None when it is not there."""
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()
