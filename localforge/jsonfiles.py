"""JSON files given on the command line, read with one-line errors that name the flag and file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localforge.errors import ConfigError


def read_json(path: Path | str, flag: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{flag} {path}: is a folder, expected a JSON file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{flag} {path}: not UTF-8 text (byte {exc.start}): save it as UTF-8 JSON") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot be read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def check_json_schema(schema: Any, where: str) -> dict:
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"{where}: not a valid JSON Schema: {exc.message}") from None
    return schema
