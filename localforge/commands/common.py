"""What every command module shares: printing, the backend option group, and groups that run a
default command (``localforge extract PATHS`` beside ``localforge extract review``).

Imports only typer here; each command imports its job when it runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from localforge.models import DEFAULT_MODEL

HELP = {"help_option_names": ["-h", "--help"]}
MODEL_PANEL = "Model and backend"


def out(text: str) -> None:
    sys.stdout.write(text + "\n")


def console(stderr: bool = False):
    """A rich console for stdout (or stderr). When that stream is not a terminal (a pipe, a file, a
    CI log) nothing is wrapped or cut: a value never breaks across lines and tables print in full."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, soft_wrap=True, width=100_000)


# --- the backend option group -----------------------------------------------------------------
# One definition for every command that talks to a model. Defaults of None mean "not given": the
# job's settings (or the server) supply the value, so each default lives in one place.

def known_backend(value: str | None) -> str | None:
    """--backend names a registered engine (a usage error, exit 2, otherwise)."""
    if value is None:
        return value
    from localforge.backends.registry import REGISTRY

    names = ["auto", *REGISTRY]
    if value not in names:
        raise typer.BadParameter(f"unknown backend {value!r}: choose one of {', '.join(names)}")
    return value


Backend = Annotated[str | None, typer.Option(
    "--backend", "-b", rich_help_panel=MODEL_PANEL, callback=known_backend,
    help="auto (the default), or a backend from `localforge doctor`.")]
Model = Annotated[str | None, typer.Option(
    "--model", "-m", rich_help_panel=MODEL_PANEL,
    help=f"Alias, HF folder, .gguf file, cached repo id, or a served model name (default {DEFAULT_MODEL}).")]
BaseUrl = Annotated[str | None, typer.Option(
    "--base-url", rich_help_panel=MODEL_PANEL, help="Server URL, for server backends.")]
ApiKeyEnv = Annotated[str | None, typer.Option(
    "--api-key-env", rich_help_panel=MODEL_PANEL,
    help="Environment variable holding the API key (default: the server's own, e.g. OPENAI_API_KEY).")]
Timeout = Annotated[float | None, typer.Option(
    "--timeout", min=0.1, rich_help_panel=MODEL_PANEL,
    help="Seconds per server call, retries included (default 120).")]
Concurrency = Annotated[int | None, typer.Option(
    "--concurrency", min=1, rich_help_panel=MODEL_PANEL, help="Requests a server runs at once (default 4).")]


def backend_flags(backend: str | None, model: str | None, base_url: str | None, api_key_env: str | None,
                  timeout: float | None, concurrency: int | None) -> dict[str, tuple[str, Any]]:
    """The option group as settings flags: {field: (flag, value)}; None is a flag not given."""
    return {"backend": ("--backend", backend), "model": ("--model", model), "base_url": ("--base-url", base_url),
            "api_key_env": ("--api-key-env", api_key_env), "timeout": ("--timeout", timeout),
            "concurrency": ("--concurrency", concurrency)}


def engine_note(name: str | None) -> None:
    """Say once, on stderr, what a user should know about running ``name`` on this OS (its spec's
    caveat), when the user picked it."""
    if not name or name == "auto":
        return
    import platform

    from localforge.backends.registry import REGISTRY

    spec = REGISTRY.get(name)
    caveat = spec.caveats.get(platform.system().lower()) if spec else None
    if caveat:
        from rich.markup import escape

        console(stderr=True).print(f"[yellow]note:[/] {escape(caveat)}", highlight=False)


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments as (``key=value`` overrides, the rest)."""
    from localforge.settings import is_override

    overrides = [a for a in args if is_override(a)]
    return overrides, [a for a in args if not is_override(a)]


# --- groups with a default command --------------------------------------------------------------


class _DefaultContext(typer.Context):
    @property
    def command_path(self) -> str:  # usage reads `localforge extract`, not `localforge extract run`
        return self.parent.command_path if self.parent is not None else super().command_path


class DefaultCommand(TyperCommand):
    """The command a ``DefaultGroup`` runs when no sub-command is named."""

    context_class = _DefaultContext


class DefaultGroup(TyperGroup):
    """A group whose arguments go to its default command (registered as ``DEFAULT``) unless they
    start with the name of one of its sub-commands: ``extract PATHS`` and ``extract review FILE``."""

    DEFAULT = "run"

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.commands:
            args = [self.DEFAULT, *args]
        return super().parse_args(ctx, args)


def group(help: str) -> typer.Typer:
    """A sub-app with a default command: register it with ``default(app)``."""
    return typer.Typer(cls=DefaultGroup, help=help, add_help_option=False, context_settings=HELP,
                       pretty_exceptions_enable=False)


def default(app: typer.Typer, **settings: Any):
    """Decorator: the group's default command (hidden from its list of sub-commands)."""
    return app.command(DefaultGroup.DEFAULT, cls=DefaultCommand, hidden=True, no_args_is_help=True,
                       context_settings={**HELP, **settings})
