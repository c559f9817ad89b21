"""Small file helpers shared by every layer: content hashes, atomic writes, header checks."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from localforge.errors import CorruptFile


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_text(path: str | Path, label: str, kind: str = "file") -> str:
    """The UTF-8 text of a file a user named; a missing file, a folder, other bytes or an unreadable
    file is a ``ConfigError`` in one line that starts with ``label`` (e.g. "--json-schema FILE")
    and calls it a ``kind`` ("config file")."""
    from localforge.errors import ConfigError

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such {kind}") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a folder, not a {kind}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot be read ({exc.strerror or exc})") from None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it into place: readers never see half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def safetensors_header(path: Path) -> tuple[int, dict]:
    """A safetensors file's header, read without its tensors: (its length in bytes, its JSON).
    ``ValueError`` (or ``OSError``) when the file has none."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("empty file" if not head else "shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size, 100 << 20):
            raise ValueError("not a safetensors header")
        return n, json.loads(f.read(n))


def check_safetensors(path: Path) -> None:
    """Raise ``CorruptFile`` unless ``path`` has a safetensors header whose tensors fit the file."""
    size = path.stat().st_size
    try:
        n, header = safetensors_header(path)
        ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as exc:
        raise CorruptFile(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if 8 + n + max(ends, default=0) > size:
        raise CorruptFile(path, "truncated: the tensors run past the end of the file")
