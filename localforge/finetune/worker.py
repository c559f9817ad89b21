"""One training process: ``python -m localforge.finetune.worker RUN_DIR`` (started by accelerate)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from localforge.errors import LocalforgeError
    from localforge.finetune.run import train

    args = list(sys.argv[1:] if argv is None else argv)
    progress = "--no-progress" not in args
    args = [a for a in args if a != "--no-progress"]
    if len(args) != 1:
        sys.stderr.write("usage: python -m localforge.finetune.worker RUN_DIR [--no-progress]\n")
        sys.exit(2)
    try:
        train(args[0], progress=progress)
    except LocalforgeError as exc:
        sys.stderr.write(f"error: {str(exc).splitlines()[0]}\n")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
