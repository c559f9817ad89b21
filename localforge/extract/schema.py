"""The record schema: a JSON Schema file, a pydantic model (``module:Class``), or inline fields.

The model is asked for ``{"records": [record, ...]}`` per chunk, so one chunk can hold several
records or none.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from localforge.errors import ConfigError
from localforge.jsonfiles import check_json_schema, read_json


def _read(path: str | Path, flag: str):
    """``read_json`` with the cases it does not word: a folder, a file that is not UTF-8 text."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p}: a folder, not a JSON file")
    try:
        return read_json(p, flag)
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {p}: not a UTF-8 text file (expected JSON)") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {p}: cannot be read ({exc.strerror or type(exc).__name__})") from None

_TYPES = {"str": "string", "string": "string", "int": "integer", "integer": "integer",
          "float": "number", "number": "number", "bool": "boolean", "boolean": "boolean",
          "list[str]": "array"}


def parse_fields(spec: str) -> dict:
    """``"title:str, release:str, frequency_mhz:float"`` -> a JSON Schema for one record."""
    props = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, kind = part.partition(":")
        name, kind = name.strip(), (kind.strip() or "str").lower()
        if not name.isidentifier():
            raise ConfigError(f"--fields: '{name}' is not a valid field name (letters, digits, _)")
        if kind not in _TYPES:
            raise ConfigError(f"--fields: field '{name}' has unknown type '{kind}' (use {', '.join(sorted(set(_TYPES)))})")
        props[name] = {"type": _TYPES[kind]} if kind != "list[str]" else {"type": "array", "items": {"type": "string"}}
    if not props:
        raise ConfigError("--fields is empty: give fields like \"title:str, year:int\"")
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def load_schema(schema: str | dict | None = None, fields: str | None = None) -> dict:
    """The record schema from ``--schema`` (a JSON Schema file, ``module:Class``, or in a config file
    the schema itself) or ``--fields``."""
    if bool(schema) == bool(fields):
        raise ConfigError("give exactly one of --schema (a JSON Schema file or module:Class) and --fields")
    if fields:
        return parse_fields(fields)
    if isinstance(schema, dict):
        data, schema = schema, "(inline)"
    elif (path := Path(schema)).suffix == ".json" or path.exists():
        data = _read(path, "--schema")
    elif ":" in schema:
        module, _, name = schema.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
            data = cls.model_json_schema()
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"--schema {schema}: cannot load a pydantic model from it ({exc})") from None
    else:
        raise ConfigError(f"--schema {schema}: expected a .json file or module:Class")
    check_json_schema(data, f"--schema {schema}")
    if data.get("type") != "object" or not isinstance(data.get("properties"), dict):
        raise ConfigError(f"--schema {schema}: the record schema must be an object with properties")
    return data


def load_examples(examples: str | Path | list | None) -> list[dict]:
    """Few-shot examples: a JSON file (``--examples``) or, in a config file, the list itself."""
    if not examples:
        return []
    data = examples if isinstance(examples, list) else _read(examples, "--examples")
    if not isinstance(data, list) or not all(isinstance(e, dict) and {"text", "records"} <= set(e) for e in data):
        raise ConfigError(f'--examples {examples if not isinstance(examples, list) else "(inline)"}: '
                          'expected a list of {"text": ..., "records": [...]}')
    return data


def chunk_schema(record: dict, max_records: int = 8) -> dict:
    """What the model returns for one chunk: a list of records. The cap stops small models that
    repeat one record until they run out of tokens (grammar-constrained engines enforce it)."""
    return {"type": "object",
            "properties": {"records": {"type": "array", "items": record, "maxItems": max_records}},
            "required": ["records"], "additionalProperties": False}


# --- records that echo the request instead of the text -------------------------------------------


def _norm(value: str) -> str:
    return " ".join(value.replace("_", " ").replace("-", " ").strip(" \t\n\"'<>[]{}()`*:.").casefold().split())


def _strings(value, key: str = "") -> list[tuple[str, str]]:
    """Every string in a record (lists item by item) with the name of the field it is in."""
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in _strings(v, str(k))]
    if isinstance(value, list):
        return [pair for v in value for pair in _strings(v, key)]
    return [(key, value)] if isinstance(value, str) and value.strip() else []


def _names(schema) -> set[str]:
    """Field names (and titles) anywhere in a JSON Schema."""
    out: set[str] = set()
    if isinstance(schema, dict):
        for name, sub in (schema.get("properties") or {}).items():
            out.add(_norm(name))
            if isinstance(sub, dict) and isinstance(sub.get("title"), str):
                out.add(_norm(sub["title"]))
        for sub in schema.values():
            if isinstance(sub, dict | list):
                out |= _names(sub)
    elif isinstance(schema, list):
        for sub in schema:
            out |= _names(sub)
    return out


def echo_of(record: dict, schema: dict, examples: list[dict], text: str) -> str | None:
    """Why ``record`` is an echo of the request rather than facts from ``text``, or None.

    A small model asked for ``{"method", "dataset"}`` may answer ``{"method": "method", "dataset":
    "dataset"}``, or copy the few-shot example's values. A record whose every string is a field
    name, or whose every string is an example's value that ``text`` does not hold, is an echo.
    Records without strings are left alone (numbers say nothing either way)."""
    strings = _strings(record)
    if not strings:
        return None
    names = _names(schema)
    if all(_norm(v) in names or _norm(v) == _norm(k) for k, v in strings):
        return "repeats the field names"
    if examples:
        shown = {_norm(v) for ex in examples for _, v in _strings(ex.get("records", []))}
        here = " ".join(text.casefold().split())
        if all(_norm(v) in shown and " ".join(v.casefold().split()) not in here for _, v in strings):
            return "repeats the example's values"
    return None
