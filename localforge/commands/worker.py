"""One training process of several: ``python -m localforge.commands.worker RUN_DIR`` (accelerate
starts one per process; ``finetune.launch`` builds the command)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from localforge.commands.finetune import train_with_progress
    from localforge.errors import LocalforgeError

    args = list(sys.argv[1:] if argv is None else argv)
    progress = "--no-progress" not in args
    args = [a for a in args if a != "--no-progress"]
    if len(args) != 1:
        sys.stderr.write("usage: python -m localforge.commands.worker RUN_DIR [--no-progress]\n")
        sys.exit(2)
    try:
        train_with_progress(args[0], progress=progress)
    except LocalforgeError as exc:
        sys.stderr.write(f"error: {str(exc).splitlines()[0]}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    except Exception as exc:  # as cli.main does: one line (the run's manifest records it as failed)
        import os

        if os.environ.get("LOCALFORGE_DEBUG"):
            raise
        lines = str(exc).strip().splitlines()
        sys.stderr.write(f"error: unexpected {type(exc).__name__}{': ' + lines[0] if lines else ''} "
                         f"(set LOCALFORGE_DEBUG=1 for the traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
