"""Every job's settings the same way: one pydantic model, read from a YAML file, then ``key=value``
overrides, then command-line flags, validated once, with one-line errors that name the key.

``load_settings(FinetuneConfig, "config.yaml", ["lora.rank=16"])`` is what ``finetune`` does;
``extract --config`` does the same with ``ExtractSettings``, so a pipeline file can hold every
job's settings in the shape of the job's own file. A model lists in ``PATHS`` the fields that
name files: a relative one is read beside the config file when it exists there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localforge.errors import ConfigError, UsageError
from localforge.files import read_text
from localforge.models import DEFAULT_MODEL

M = TypeVar("M", bound=BaseModel)

_KINDS = {"int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
          "float_parsing": "a number",
          "float_type": "a number", "bool_parsing": "true or false", "bool_type": "true or false",
          "string_type": "a string", "list_type": "a list", "dict_type": "a mapping"}


_UNION_TAGS = ("int", "bool", "float", "str")
_TAG_PREFIXES = ("literal[", "dict[", "list[", "constrained-", "function-", "nullable[")


def _key(err: dict) -> str:
    # pydantic adds the union member tried (int, literal['auto'], constrained-int, ...) to the
    # location: drop it; list positions read as [0]
    key = ""
    for p in err["loc"]:
        if isinstance(p, int):
            key += f"[{p}]"
        elif str(p) not in _UNION_TAGS and not str(p).startswith(_TAG_PREFIXES):
            key += f".{p}" if key else str(p)
    return key


def _wanted(err: dict) -> str:
    """What one alternative of a field accepts, in words."""
    ctx, kind = err.get("ctx") or {}, err["type"]
    noun = "a whole number" if "int" in str(err["loc"][-1:]) or isinstance(err.get("input"), int) else "a number"
    words = {"literal_error": lambda: ctx["expected"], "greater_than_equal": lambda: f"{noun} >= {ctx['ge']}",
             "greater_than": lambda: f"{noun} > {ctx['gt']}", "less_than_equal": lambda: f"{noun} <= {ctx['le']}",
             "less_than": lambda: f"{noun} < {ctx['lt']}", "finite_number": lambda: "a finite number",
             "none_required": lambda: "null"}
    if kind in words:
        return words[kind]()
    return _KINDS.get(kind, err["msg"][0].lower() + err["msg"][1:])


def problem(errors: list[dict]) -> tuple[str, str]:
    """The first offending key, and what is wrong with it in words (union alternatives merged)."""
    first = errors[0]
    key = _key(first)
    got = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return key, "is not known; check its spelling"
    if first["type"] == "missing":
        return key, "is required"
    if first["type"] == "value_error" or not key:
        return key, msg
    if first["type"] == "too_short":  # an empty list or string
        what = "item" if isinstance(got, list | tuple | dict) else "character"
        n = first.get("ctx", {}).get("min_length", 1)
        return key, f"expected at least {n} {what}{'s' if n != 1 else ''}, got {got!r}"
    same = [e for e in errors if _key(e) == key]
    if len(same) > 1 or first["type"] in _KINDS or first["type"] == "literal_error":
        wanted = [_wanted(e) for e in same]
        return key, f"expected {' or '.join(dict.fromkeys(wanted))}, got {got!r}"
    return key, f"{msg[0].lower() + msg[1:]}, got {got!r}"


def describe(errors: list[dict]) -> str:
    """One line for the first offending config key."""
    return describe_key(*problem(errors))


def describe_key(key: str, what: str) -> str:
    """``config key 'KEY': WHAT`` (or ``config: WHAT`` for a problem of no one key)."""
    if not key:
        return f"config: {what}"
    joiner = " " if what.startswith(("is not known", "is required")) else ": "
    return f"config key '{key}'{joiner}{what}"


def _covers(set_key: str, key: str) -> bool:
    """Whether setting ``set_key`` (``lora`` or ``lora.rank``) set ``key`` (``lora.rank``, ``lora.targets[0]``)."""
    return key == set_key or key.startswith((set_key + ".", set_key + "[")) or set_key.startswith(key + ".")


def key_error(key: str, what: str, path: str | Path | None = None, overrides: Sequence[str] = (),
              flags: Mapping[str, tuple[str, Any]] | None = None) -> ConfigError:
    """The one-line error for a bad value of ``key``, naming where the value came from: the flag
    (a ``UsageError``, exit 2), the ``key=value`` override, or the config file (or the default)."""
    for field, (flag, value) in (flags or {}).items():
        if value is not None and _covers(field, key):
            return UsageError(f"{flag}: {what}")
    for item in reversed(list(overrides)):
        if _covers(item.partition("=")[0].strip(), key):
            return ConfigError(f"override '{item}': {describe_key(key, what)}")
    return ConfigError((f"{path}: " if path else "") + describe_key(key, what))


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, item: str) -> str:
    """``lora.rank=16`` sets data["lora"]["rank"] = 16 (values parsed as YAML); returns the key."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': write key=value, e.g. steps=200 or lora.rank=16")
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    node[parts[-1]] = _parse_value(value)
    return key.strip()


def is_override(arg: str) -> bool:
    """Whether a command-line argument is a ``key=value`` override (not a file that exists)."""
    key, sep, _ = arg.partition("=")
    return bool(sep) and key.replace(".", "").replace("_", "").isalnum() and not Path(arg).exists()


def read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    text = read_text(p, str(p), "config file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _set(data: dict, key: str, value: Any) -> None:
    """``data[key] = value``, where a dotted key (``teacher.backend``, a flag that sets one key of a
    section) sets that key inside its section."""
    *sections, last = key.split(".")
    node = data
    for part in sections:
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], dict):
            return  # not a section: validation names the key
        node = node[part]
    node[last] = value


def _expand(model: type[BaseModel], data: dict) -> dict:
    """A section given as one value where the model allows it (``SHORTHANDS``: a pipeline's
    ``teacher: REF`` is ``teacher: {model: REF}``), so ``teacher.backend=...`` can set a key of it."""
    for name, key in getattr(model, "SHORTHANDS", {}).items():
        if isinstance(data.get(name), str):
            data[name] = {key: data[name]}
    return data


def _beside(model: type[BaseModel], data: dict, beside: Path, given: set[str], prefix: str = "") -> None:
    """Paths in ``data`` that ``model`` names in ``PATHS`` (a string or a list of them), relative and
    there beside the config file, are read from there; so are those of the sections it names in
    ``SECTIONS`` (a pipeline file's ``extract.schema``). A path set by a flag is the shell's."""
    import typing

    def moved(value):
        if isinstance(value, str) and value.strip() and not Path(value).expanduser().is_absolute() \
                and (beside / value).exists():
            return str(beside / value)
        return value

    for field in getattr(model, "PATHS", ()):
        if field in data and prefix + field not in given:
            value = data[field]
            data[field] = [moved(v) for v in value] if isinstance(value, list) else moved(value)
    for name in getattr(model, "SECTIONS", ()):
        section = data.get(name)
        info = model.model_fields.get(name)
        if not isinstance(section, dict) or info is None:
            continue
        sub = next((a for a in (info.annotation, *typing.get_args(info.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            _beside(sub, section, beside, given, f"{prefix}{name}.")


def load_settings(model: type[M], path: str | Path | None = None, overrides: Sequence[str] = (),
                  flags: Mapping[str, tuple[str, Any]] | None = None) -> M:
    """``model`` validated from the YAML file at ``path`` (optional), then ``overrides``
    (``key=value``), then ``flags`` ({field: (flag, value)}; a value of None is a flag not given;
    a dotted field, ``teacher.backend``, sets a key of a section)."""
    data = _expand(model, read_yaml(path) if path is not None else {})
    for item in overrides:
        apply_override(data, item)
        _expand(model, data)
    given = {field: (flag, value) for field, (flag, value) in (flags or {}).items() if value is not None}
    for field, (_, value) in given.items():
        _set(data, field, value)
    if path is not None:
        _beside(model, data, Path(path).parent, set(given))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        key, what = problem(errors)
        keys = list(dict.fromkeys(_key(e) for e in errors))
        more = f" (and {len(keys) - 1} more key{'s' if len(keys) > 2 else ''})" if len(keys) > 1 else ""
        raise key_error(key, what + more, path, overrides, flags) from None


class BackendChoice(BaseModel):
    """The model a job talks to and how: the same keys (and flags) in every job that generates.
    Server settings left at None take the server's own defaults."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field("auto", description="the engine: auto, or a name `localforge doctor` lists")
    model: str = Field(DEFAULT_MODEL, description="a model reference: an alias, a HF folder, a .gguf, a cached repo id, ollama:TAG")
    base_url: str | None = Field(None, description="a server backend's URL (default: the server's usual one)")
    api_key_env: str | None = Field(None, description="the variable holding the server's API key (never the key itself)")
    timeout: float | None = Field(None, gt=0, description="seconds per server call, retries included")
    concurrency: int = Field(4, ge=1, description="requests a server runs at once")

    def backend_options(self) -> dict[str, Any]:
        """Keyword arguments for ``backends.get_backend`` besides the name and model."""
        return {"base_url": self.base_url, "api_key_env": self.api_key_env, "timeout": self.timeout,
                "concurrency": self.concurrency}
