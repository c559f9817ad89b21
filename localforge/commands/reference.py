"""The README's config reference, generated from the settings models themselves.

    python -m localforge.commands.reference              # print it
    python -m localforge.commands.reference --write README.md
    python -m localforge.commands.reference --check README.md   # exit 1 when it drifted

One table per job: every key (nested sections as ``lora.rank``), its type, its default and what
it does, from the pydantic fields' annotations, defaults and descriptions.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
PACKAGE = Path(__file__).resolve().parents[1]

# (title, "module:Class", what reads it). A field whose type is another settings model is a
# section: its keys are listed under it (``lora.rank``) unless the model has its own table here.
SECTIONS = (
    ("extract", "localforge.extract.pipeline:ExtractSettings",
     "`localforge extract --config FILE` (flags and `key=value` override it); a pipeline file's `extract:`"),
    ("teach generate", "localforge.teach.generate:GenerateSettings",
     "`localforge teach generate --config FILE`; a pipeline file's `generate:`"),
    ("teach dcr", "localforge.teach.settings:TeachSettings",
     "`localforge teach dcr --config FILE`; a pipeline file's `dcr:`"),
    ("teach adaptive and teach eval", "localforge.teach.adaptive:AdaptiveSettings",
     "`localforge teach adaptive|eval --config FILE`: the `teach dcr` keys and these"),
    ("finetune", "localforge.finetune.config:FinetuneConfig",
     "`localforge finetune CONFIG`; a pipeline file's `finetune:` (without `data` and `output_dir`, which the run sets)"),
    ("run (the pipeline file)", "localforge.pipeline.settings:PipelineSettings",
     "`localforge run PIPELINE`: the shared keys fill what a section leaves unset"),
)


def _model(ref: str) -> type[BaseModel]:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _own_table(model: type) -> str | None:
    for title, ref, _ in SECTIONS:
        if _model(ref) is model:
            return title
    return None


def _type(annotation) -> str:
    """A reader's name for a field's type: ``int | "auto"``, ``"lora" | "dora"``, ``list[str]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        text = " \\| ".join(dict.fromkeys(_type(a) for a in parts))
        return text + (" \\| null" if len(parts) < len(args) else "")
    if origin is not None:
        inner = ", ".join(_type(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else origin.__name__
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f'"{m.value}"' for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        path = Path(value)
        if path.is_absolute() and PACKAGE in path.parents:  # a file shipped in the package
            value = f"<localforge>/{path.relative_to(PACKAGE).as_posix()}"
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_default_item(v) for v in value) + "]"
    return str(value)


def _default_item(value) -> str:
    if isinstance(value, BaseModel):
        return str(next(iter(value.model_dump().values())))
    return str(value)


def _section_model(annotation) -> type[BaseModel] | None:
    """The settings model a field holds (``LoraConfig``, ``GrpoConfig | None``), if any."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def rows(model: type[BaseModel], prefix: str = "", top: type[BaseModel] | None = None) -> list[tuple[str, ...]]:
    """(key, type, default, description) for every field, nested sections flattened."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        inner = _section_model(field.annotation)
        own = _own_table(inner) if inner is not None else None
        if inner is not None and own is not None and inner is not (top or model):
            out.append((key, "section", "(section)",
                        f"{description + '; ' if description else ''}the keys of [{own}](#{_anchor(own)})"))
            continue
        if inner is not None:
            optional = "null" in _type(field.annotation)
            out.append((key, "section" + (" \\| null" if optional else ""), _default(field), description))
            out.extend(rows(inner, key + ".", top or model))
            continue
        out.append((key, _type(field.annotation), _default(field), description))
    return out


def _anchor(title: str) -> str:
    return "config-" + "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-").replace("--", "-")


def render() -> str:
    parts = []
    for title, ref, note in SECTIONS:
        parts += [f'<a id="{_anchor(title)}"></a>', f"### {title}", "", note + ".", "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        parts += [f"| `{k}` | {t} | `{d}` | {desc} |" for k, t, d, desc in rows(_model(ref))]
        parts.append("")
    return "\n".join(parts)


def splice(text: str, body: str) -> str:
    """``text`` with what lies between the markers replaced by ``body``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no {BEGIN} ... {END} markers: add them where the reference goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localforge.commands.reference", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="README", help="replace the reference between the markers in this file")
    group.add_argument("--check", metavar="README", help="exit 1 when the reference in this file differs")
    args = parser.parse_args(argv)
    body = render()
    target = args.write or args.check
    if target is None:
        print(body)
        return 0
    path = Path(target)
    try:
        text = path.read_text()
        wanted = splice(text, body)
    except (OSError, ValueError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if text != wanted:
            print(f"error: {path}: the config reference is out of date: run "
                  f"python -m localforge.commands.reference --write {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
