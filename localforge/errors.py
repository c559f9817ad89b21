"""User-facing errors.

Every error localforge raises on purpose derives from ``LocalforgeError``. Its message is one
line that names what is wrong (a file, a field, a backend) and what to do; the CLI prints it
without a traceback.
"""

from __future__ import annotations


class LocalforgeError(Exception):
    """An error whose message is meant for the user, as one line."""

    exit_code = 1


class ConfigError(LocalforgeError):
    """A bad value in a config file, a flag or an argument."""


class UsageError(ConfigError):
    """A bad value given on the command line (a flag): exit code 2, as for other usage errors."""

    exit_code = 2


class CorruptFile(LocalforgeError):
    """A file that exists but cannot be read as what it should be (random bytes, empty, truncated)."""

    def __init__(self, path, detail: str = "", what: str = ""):
        self.path = str(path)
        hint = f" ({detail})" if detail else ""
        todo = f": {what}" if what else ": replace it with a good copy"
        super().__init__(f"corrupt or unreadable: {path}{hint}{todo}")


class ModelNotFound(LocalforgeError):
    """A model reference that does not resolve to local files."""


class MissingDependency(LocalforgeError):
    """An optional stack (an extra) that is not installed."""

    def __init__(self, what: str, extra: str, module: str | None = None):
        self.what, self.extra, self.module = what, extra, module
        detail = f" (no module '{module}')" if module else ""
        super().__init__(f"{what} needs the '{extra}' extra{detail}: pip install 'localforge[{extra}]'")
