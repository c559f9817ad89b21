"""The `localforge` command: one module per verb in ``localforge/commands/``, gathered here, and
the one place that turns errors into a line on stderr and an exit code.

Command modules import their jobs inside the commands, so `localforge --help` stays fast.
"""

from __future__ import annotations

import os
import sys

import typer

from localforge.commands import adapters, doctor, extract, finetune, generate, models, teach
from localforge.commands import export as export_command
from localforge.commands import run as run_command
from localforge.commands import serve as serve_command
from localforge.commands.common import HELP

app = typer.Typer(
    name="localforge",
    help="Build small, specialised LLMs on your own hardware: extract records from documents, teach (training pairs, DCR, adaptive teaching), fine-tune (SFT, GRPO), export and serve models; `run` chains them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP,
)
app.command()(doctor.doctor)
app.command()(generate.generate)
app.add_typer(models.app, name="models")
app.add_typer(extract.app, name="extract")
app.add_typer(finetune.app, name="finetune")
app.add_typer(adapters.app, name="adapters")
app.add_typer(export_command.app, name="export")
app.add_typer(teach.app, name="teach")
app.command()(serve_command.serve)
app.add_typer(run_command.app, name="run")


def main() -> None:
    """Run the app; print a one-line error instead of a traceback for anything expected."""
    from localforge.errors import LocalforgeError

    try:
        code = app(standalone_mode=False)
    except LocalforgeError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # usage errors from typer's click, and anything unexpected
        if type(exc).__name__ == "Abort":
            _fail("aborted", 130)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # a click usage error
            if not exc.format_message():  # no arguments: click has printed the help
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx else ""
            _fail(f"{exc.format_message()}{hint}", exc.exit_code)
        if os.environ.get("LOCALFORGE_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (set LOCALFORGE_DEBUG=1 for the traceback)", 1)
    if code == 130:  # typer turns Ctrl-C inside a command into a silent exit code 130
        _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    sys.stderr.write(f"error: {first}\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
