"""Structured output, the same on every backend: ``generate_json(backend, conversation, schema)``.

The ladder: a grammar built from the schema where the engine takes one (llama.cpp in-process and
llama.cpp's servers; ``grammar.schema_to_gbnf`` holds integer and number ranges and string
lengths, which the engines' own schema modes drop), else the engine's native schema mode, else its
JSON mode, else prompt-and-parse. Whatever the rung, the answer is parsed (``extract_json`` copes
with fences, prose and small slips) and validated with jsonschema, for what a grammar cannot hold.
On a failure the model is asked again with the validation error and a new seed (a re-ask samples
anew, it does not replay the same draw), up to ``attempts`` times; the final error carries every
attempt so callers can record rejects. An answer cut off at ``max_tokens`` says so.

Structured output sits on top of a backend, not inside it: ``generate_json(backend, ...)`` calls
``backend.chat``. Which modes a server or model rejected is remembered once per process
(``PROBES``, keyed by ``backend.identity()``), so each is probed only once.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from localforge.backends.types import BackendError, Conversation, GenerationParams, Unsupported

if TYPE_CHECKING:
    from localforge.backends.base import Backend

MODES = ("grammar", "schema", "json", "prompt")


class ProbeMemory:
    """Per backend identity (server and model): the structured-output modes it rejected, and the
    ones it has accepted at least once (a server's error on an accepted mode is a real error,
    not a rejected mode)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rejected: dict[tuple, set[str]] = {}
        self._accepted: set[tuple[tuple, str]] = set()

    def rejected(self, identity: tuple) -> set[str]:
        with self._lock:
            return set(self._rejected.get(identity, ()))

    def reject(self, identity: tuple, mode: str) -> None:
        with self._lock:
            self._rejected.setdefault(identity, set()).add(mode)

    def accepted(self, identity: tuple, mode: str) -> bool:
        return (identity, mode) in self._accepted

    def accept(self, identity: tuple, mode: str) -> None:
        with self._lock:
            self._accepted.add((identity, mode))

    def forget(self, identity: tuple) -> None:
        with self._lock:
            self._rejected.pop(identity, None)
            self._accepted = {a for a in self._accepted if a[0] != identity}


PROBES = ProbeMemory()


def structured_modes(backend: Backend) -> list[str]:
    """The structured-output ladder for ``backend``, best first; ends with "prompt"."""
    caps = backend.capabilities
    native = [m for m, ok in (("grammar", caps.grammar), ("schema", caps.json_schema), ("json", caps.json_mode)) if ok]
    known_bad = PROBES.rejected(backend.identity())
    return [m for m in native if m not in known_bad] + ["prompt"]


def forget_probes(backend: Backend) -> None:
    """Probe this server and model's structured-output modes again (after an upgrade, say)."""
    PROBES.forget(backend.identity())


@dataclass
class Attempt:
    mode: str
    text: str
    error: str
    seed: int | None = None  # the seed this attempt sampled with
    finish_reason: str = "stop"  # "length": the answer reached the token limit


class StructuredOutputError(BackendError):
    """No attempt produced JSON that validates; ``attempts`` holds each raw answer and its error."""

    def __init__(self, message: str, attempts: list[Attempt]):
        super().__init__(message)
        self.attempts = attempts


class JSONExtractionError(ValueError):
    pass


def schema_of(schema: Any) -> tuple[dict, type | None]:
    """A JSON Schema dict, and the pydantic model it came from (if it did)."""
    if isinstance(schema, dict):
        return schema, None
    if hasattr(schema, "model_json_schema"):
        return schema.model_json_schema(), schema
    raise TypeError(f"schema must be a JSON Schema dict or a pydantic model class, got {type(schema).__name__}")


# --- parsing model output ---------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def extract_json(text: str) -> Any:
    """The first JSON value in ``text``: inside a code fence, after prose, or with small slips.

    Only a complete value is taken (brackets balanced, strings respected): an answer cut off
    part-way is an error, never completed by guessing. Within a complete value, slips are repaired:
    by hand, trailing commas and Python's True/False/None outside strings; then by ``json_repair``
    (when installed), single quotes, unquoted keys, missing commas, comments and stray quotes
    inside strings. Raw control characters inside strings are accepted. Raises
    ``JSONExtractionError`` when there is no JSON value to find.
    """
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for chunk in candidates:
        for start in (i for i, ch in enumerate(chunk) if ch in "{["):
            span = _balanced(chunk, start)
            if span is None:
                continue
            for attempt in (span, _repair(span)):
                try:
                    return json.loads(attempt, strict=False, parse_constant=_not_json)
                except json.JSONDecodeError:
                    pass
            repaired = _library_repair(span)
            if repaired is not None:
                return repaired
    stripped = text.strip()
    try:
        return json.loads(stripped, parse_constant=_not_json)  # a bare scalar ("42", "\"yes\"")
    except json.JSONDecodeError:
        raise JSONExtractionError(f"no JSON object found in the answer: {stripped[:80]!r}") from None


def _not_json(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def _library_repair(span: str) -> Any:
    """``json_repair`` on one balanced span: an object or array back, or None. Not on the whole
    answer: there it completes cut-off values (``"age": 2`` from ``"age": 25...``) and makes
    ``""`` out of prose, which would pass for an answer."""
    try:
        import json_repair
    except ImportError:
        return None
    try:
        value = json_repair.loads(span)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict | list) or not value:
        return None
    try:  # NaN and Infinity are not JSON
        json.dumps(value, allow_nan=False)
    except ValueError:
        return None
    return value


def _outside_strings(s: str, start: int = 0):
    """Yield ``(index, char, outside)``; ``outside`` is False inside a JSON string, quotes included."""
    in_str = esc = False
    for i in range(start, len(s)):
        ch = s[i]
        if in_str:
            yield i, ch, False
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
            yield i, ch, False
        else:
            yield i, ch, True


def _balanced(s: str, start: int) -> str | None:
    """The substring from ``start`` to its matching bracket, strings and escapes respected."""
    stack: list[str] = []
    pairs = {"{": "}", "[": "]"}
    for i, ch, outside in _outside_strings(s, start):
        if not outside:
            continue
        if ch in pairs:
            stack.append(pairs[ch])
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                return s[start : i + 1]
    return None


def _repair(span: str) -> str:
    """Python literals (True/False/None) outside strings become JSON; trailing commas go."""
    inside = {i for i, _, outside in _outside_strings(span) if not outside}
    out, i = [], 0
    while i < len(span):
        for word, repl in (("True", "true"), ("False", "false"), ("None", "null")):
            if i not in inside and span.startswith(word, i) and not span[i + len(word) : i + len(word) + 1].isalnum():
                out.append(repl)
                i += len(word)
                break
        else:
            out.append(span[i])
            i += 1
    return _TRAILING_COMMA.sub(r"\1", "".join(out))


# --- the ladder ----------------------------------------------------------------------------------


def describe_schema(schema: dict) -> str:
    """A schema as a small model reads it best: the keys with their types and limits.

    Small models given a raw JSON Schema tend to echo it back; a plain description works.
    Schemas that are not a flat object fall back to the JSON Schema itself."""
    props = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(props, dict):
        return f"a JSON value matching this JSON Schema: {json.dumps(schema, separators=(',', ':'))}"
    required = set(schema.get("required", []))
    parts = []
    for key, sub in props.items():
        kind = sub.get("type", "any") if isinstance(sub, dict) else "any"
        limits = []
        if isinstance(sub, dict):
            if "enum" in sub:
                limits.append("one of " + ", ".join(json.dumps(v) for v in sub["enum"]))
            if "minimum" in sub and "maximum" in sub:
                limits.append(f"from {sub['minimum']} to {sub['maximum']}")
            elif "minimum" in sub:
                limits.append(f"at least {sub['minimum']}")
            elif "maximum" in sub:
                limits.append(f"at most {sub['maximum']}")
            if "maxLength" in sub:
                limits.append(f"at most {sub['maxLength']} characters")
            if kind == "array" and isinstance(sub.get("items"), dict):
                kind = f"array of {sub['items'].get('type', 'values')}"
        opt = "" if key in required else ", optional"
        parts.append(f'"{key}" ({kind}{", " + ", ".join(limits) if limits else ""}{opt})')
    return "a JSON object with the keys " + "; ".join(parts)


def _instruction(schema: dict) -> str:
    return f"Reply with {describe_schema(schema)}. Write only the JSON, no other text."


def _with_instruction(conversation: Conversation, schema: dict) -> Conversation:
    conv = [dict(m) for m in conversation]
    last = conv[-1]
    if last["role"] == "user":
        last["content"] = f"{last['content']}\n\n{_instruction(schema)}"
    else:
        conv.append({"role": "user", "content": _instruction(schema)})
    return conv


def reask_seed(seed: int | None, attempt: int) -> int | None:
    """The seed for ``attempt`` (0 is the first ask): the caller's seed first, then a new one per
    re-ask, derived so that a run stays repeatable (and the call cache cannot replay a draw)."""
    if attempt == 0:
        return seed
    return zlib.crc32(f"{seed}/{attempt}".encode()) & 0x7FFFFFFF


def generate_json(
    backend: Backend,
    conversation: Conversation,
    schema: Any,
    params: GenerationParams | None = None,
    attempts: int = 3,
    check: Callable[[Any], None] | None = None,
) -> Any:
    """Return an object that validates against ``schema`` (a model instance for pydantic).

    ``check(obj)`` adds what a schema cannot say (a value the answer must contain, say): a
    ``ValueError`` it raises is re-asked like a schema error, its message fed back to the model."""
    import jsonschema

    schema_dict, model_cls = schema_of(schema)
    validator = jsonschema.Draft202012Validator(schema_dict)
    params = params or GenerationParams(max_tokens=512)
    first = conv = _with_instruction(conversation, schema_dict)  # every rung benefits from the schema
    tried: list[Attempt] = []
    modes = structured_modes(backend)
    mode = modes.pop(0)
    gbnf: str | None = None
    while len(tried) < attempts:
        if mode == "grammar" and gbnf is None:
            try:
                gbnf = _grammar(schema_dict)
            except Unsupported:  # this schema, not this backend: the next rung, not remembered
                mode = modes.pop(0)
                continue
        # "json" mode still passes the schema: engines that take it as a hint (llama.cpp) use it
        mode_params = replace(
            params,
            json_schema=schema_dict if mode in ("schema", "json") else None,
            json_object=mode == "json",
            grammar=gbnf if mode == "grammar" else None,
            seed=reask_seed(params.seed, len(tried)),
        )
        try:
            result = backend.chat(conv, mode_params)
        except Unsupported:
            PROBES.reject(backend.identity(), mode)  # remembered for this server and model
            mode = modes.pop(0)
            continue
        text = result.text
        try:
            obj = extract_json(text)
            errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            if errors:
                where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
                raise ValueError(f"{where}: {errors[0].message}")
            value = model_cls.model_validate(obj) if model_cls else obj
            if check is not None:
                check(value)
            return value
        except ValueError as exc:
            cut = result.finish_reason == "length"
            error = (f"the answer reached the token limit ({params.max_tokens} tokens) before its JSON was "
                     f"complete: {exc}; raise max_tokens or ask for less" if cut else str(exc))
            tried.append(Attempt(mode, text, error, mode_params.seed, result.finish_reason))
            # Re-ask with only the latest answer and its error, so the prompt does not grow.
            why = "That answer was cut off: it is too long." if cut else f"That answer is not valid: {exc}."
            conv = first + [
                {"role": "assistant", "content": text},
                {"role": "user", "content": f"{why} {_instruction(schema_dict)}"},
            ]
    raise StructuredOutputError(
        f"{backend.name}: no valid JSON after {attempts} attempts; last error: {tried[-1].error}", tried
    )


def _grammar(schema: dict) -> str:
    """The grammar for ``schema``, built once per schema (an extraction asks with one schema many times)."""
    return _grammar_of(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _grammar_of(schema_json: str) -> str:
    from localforge.backends.grammar import schema_to_gbnf

    return schema_to_gbnf(json.loads(schema_json))
