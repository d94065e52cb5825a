"""How every command of the project ends on a problem the user can fix.

``run_main(main)`` is the ``if __name__ == "__main__":`` body of each stage module: it sets up
the log (:func:`setup_logging`), runs ``main`` and turns a :class:`UserError` (config, dataset, extraction, checksum, tracking, ...)
into one line ``error: <message>`` on stderr and exit status 2, with no traceback. The traceback
is shown too with ``PIPELINE_VERBOSE=1`` or ``--verbose``. Anything else (a bug) keeps Python's
traceback. A ``main`` that returns an int keeps it as the exit status.

This module imports nothing from the project, so any module can import it without loops.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

EXIT_USER_ERROR = 2
VERBOSE_ENV = "PIPELINE_VERBOSE"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UserError(Exception):
    """A problem the user can fix (a file, key or option and what to do), not a bug.

    ``details`` (optional, set by the raiser) says where the full account is (e.g. the manifest
    path) when the message has more lines than the one ``run_main`` prints.
    """

    details: str = ""


def verbose_requested(argv: Sequence[str] | None = None) -> bool:
    flag = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return flag or "--verbose" in (argv or ())


def error_line(exc: BaseException) -> str:
    """``error: <first line of the message>``, with a pointer to the rest if there is more."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return f"error: {type(exc).__name__}"
    line = lines[0]
    if len(lines) > 1:
        where = getattr(exc, "details", "") or f"{VERBOSE_ENV}=1 shows them"
        line += f" [{len(lines) - 1} more line(s): {where}]"
    return f"error: {line}"


def setup_logging() -> None:
    """The log of every command: the project's INFO lines with their time, and only warnings
    from the libraries (converters and trackers log each of their steps at INFO)."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("pipeline").setLevel(logging.INFO)


def run_main(main: Callable[..., Any], argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main(argv)`` (default ``sys.argv[1:]``, ``--verbose`` removed) and exit.

    Exit status: what ``main`` returned if an int, else 0; 2 on a :class:`UserError`.
    """
    setup_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = verbose_requested(args)
    args = [a for a in args if a != "--verbose"]
    try:
        rc = main(args)
    except UserError as exc:
        if verbose:
            traceback.print_exc()
        sys.stdout.flush()
        print(error_line(exc), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    raise SystemExit(rc if isinstance(rc, int) else 0)
