"""HMAC-SHA256 signatures for dataset rows.

A row's signature covers its canonical serialisation: the row without its ``signature`` key, as
JSON with sorted keys, separators ``(",", ":")``, non-ASCII kept as UTF-8, no NaN. The key comes
from an environment variable (``LOCALFORGE_SIGNING_KEY`` by default) and is never written, printed
or put in an error: only its key id is (``<VAR>_ID`` when set, else the first 8 hex digits of the
key's sha256). Rows are written in their canonical form, so verifying also checks that a line is
byte for byte what was signed: any changed byte is caught, even one that leaves the JSON equal.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from localforge.errors import ConfigError

KEY_ENV = "LOCALFORGE_SIGNING_KEY"
SIGNATURE = "signature"
ALGORITHM = "HMAC-SHA256"
MIN_KEY_CHARS = 16


def canonical(row: Mapping) -> bytes:
    """The bytes a signature covers: ``row`` without its signature, sorted keys, compact, UTF-8."""
    body = {k: v for k, v in row.items() if k != SIGNATURE}
    return dumps(body).encode("utf-8")


def dumps(obj) -> str:
    """The canonical JSON text (also how signed rows are written, one per line)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    env: str
    secret: bytes = field(repr=False)  # never shown: repr and str print the key id alone

    def __str__(self) -> str:
        return f"key {self.key_id} (from ${self.env})"

    def sign(self, row: Mapping) -> str:
        return hmac.new(self.secret, canonical(row), hashlib.sha256).hexdigest()

    def matches(self, row: Mapping, signature: str) -> bool:
        return hmac.compare_digest(self.sign(row).encode("ascii"), signature.encode("utf-8", "replace"))


def key_from_env(env_name: str = KEY_ENV, environ: Mapping[str, str] | None = None,
                 what: str = "--sign") -> SigningKey:
    """The key in ``$env_name``; a one-line ConfigError naming the variable (never its value) when
    it is unset, empty or short."""
    environ = os.environ if environ is None else environ
    if not env_name or not env_name.replace("_", "").isalnum():
        raise ConfigError(f"{what}: {env_name!r} is not an environment variable name")
    value = environ.get(env_name)
    if not value:
        raise ConfigError(f"{what} needs a key in the environment variable {env_name}: set it to a secret "
                          "(e.g. `export {0}=$(openssl rand -hex 32)`)".format(env_name))
    if len(value) < MIN_KEY_CHARS:
        raise ConfigError(f"{what}: the key in {env_name} is too short; use at least {MIN_KEY_CHARS} random "
                          "characters (e.g. `openssl rand -hex 32`)")
    secret = value.encode("utf-8")
    key_id = environ.get(f"{env_name}_ID") or hashlib.sha256(secret).hexdigest()[:8]
    if not key_id.isprintable() or len(key_id) > 64 or secret.decode("utf-8") in key_id:
        raise ConfigError(f"{what}: {env_name}_ID must be a short printable name that is not the key itself")
    return SigningKey(key_id=key_id, env=env_name, secret=secret)


def sign_row(row: dict, key: SigningKey) -> dict:
    """``row`` with ``signature: {alg, key_id, value}`` over its canonical form."""
    body = {k: v for k, v in row.items() if k != SIGNATURE}
    return {**body, SIGNATURE: {"alg": ALGORITHM, "key_id": key.key_id, "value": key.sign(body)}}


def check_row(line: bytes, row: object, keys: Mapping[str, SigningKey]) -> tuple[str, str]:
    """(status, detail) of one parsed line: ``verified``, ``unsigned``, ``unknown-key`` or
    ``tampered``. ``line`` is the raw line without its newline."""
    if not isinstance(row, dict):
        return "tampered", "not a JSON object"
    sig = row.get(SIGNATURE)
    if sig is None:
        signer = _signer(row)
        if signer is not None:
            return "tampered", f"the row names signer {signer!r} but carries no signature"
        return "unsigned", "no signature"
    if (not isinstance(sig, dict) or set(sig) != {"alg", "key_id", "value"} or sig["alg"] != ALGORITHM
            or not isinstance(sig["key_id"], str) or not isinstance(sig["value"], str)):
        return "tampered", "the signature field is malformed"
    signer = _signer(row)
    if signer != sig["key_id"]:
        return "tampered", f"signed by {sig['key_id']!r} but the row names signer {signer!r}"
    key = keys.get(sig["key_id"])
    if key is None:
        return "unknown-key", f"signed with key {sig['key_id']!r}, which no given key has"
    try:
        ok = key.matches(row, sig["value"])
        same_bytes = dumps(row).encode("utf-8") == line
    except (UnicodeEncodeError, ValueError):
        return "tampered", "the row cannot be serialised canonically"
    if not ok:
        return "tampered", "the signature does not match the content"
    if not same_bytes:
        return "tampered", "the line's bytes differ from the signed canonical form"
    return "verified", f"key {key.key_id}"


def _signer(row: dict) -> object:
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else row
    prov = meta.get("provenance") if isinstance(meta, dict) else None
    return prov.get("signer_key_id") if isinstance(prov, dict) else None
