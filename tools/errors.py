"""One kind of error for bad user input, reported as one line and exit code 2."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USAGE = 2


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file): printed as one line, no traceback."""


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point, turning UserError into one line and exit code 2."""
    try:
        main()
    except UserError as exc:
        fail(" ".join(str(exc).split()))
