"""`localforge teach dataset`: export, sign, verify, inspect and import distillation datasets."""

from __future__ import annotations

import typer

from localforge.commands import common

app = typer.Typer(help="Export, sign, verify, inspect and import distillation datasets.",
                  no_args_is_help=True, context_settings=common.HELP)
