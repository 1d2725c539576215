"""One kind of error for bad user input, reported as one line and exit code 2."""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

EXIT_USAGE = 2


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file): printed as one line, no traceback."""


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def user_message(exc: UserError) -> str:
    """The error's own sentence, on one line.

    A DataLoader worker re-raises an exception with the worker's traceback folded into its
    message ("Caught X in DataLoader worker ... Original Traceback ..."); the sentence that the
    code raised is the last line there, after "module.ClassName: ".
    """
    text = str(exc)
    if "Original Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        head, sep, rest = text.partition(": ")
        if sep and " " not in head:
            text = rest
    return " ".join(text.split())


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point: UserError becomes one line and exit code 2; warnings are one line."""
    warnings.formatwarning = _one_line_warning
    try:
        main()
    except UserError as exc:
        fail(user_message(exc))
