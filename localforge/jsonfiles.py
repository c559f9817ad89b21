"""JSON files given on the command line, read with one-line errors that name the flag and file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localforge.errors import ConfigError
from localforge.files import read_text


def read_json(path: Path | str, flag: str) -> Any:
    text = read_text(path, f"{flag} {path}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def check_json_schema(schema: Any, where: str) -> dict:
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"{where}: not a valid JSON Schema: {exc.message}") from None
    return schema
