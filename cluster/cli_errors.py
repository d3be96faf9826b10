"""One way for every command to answer bad input: one ``error:`` line and exit status 2.

Input errors in this project are ``ValueError`` (``ConfigError``, ``DataError``, encoder
mismatches ...) or ``FileNotFoundError``, each with a message naming the file or key; a
traceback adds nothing for the user and hides that line. Anything else is a program bug
and keeps its traceback. ``--debug`` (or ``MEDSSL_DEBUG=1``) shows the traceback of input
errors too. Under torchrun only rank 0 prints, so a multi-rank run shows the message once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from cluster.storage.errors import StorageError
from cluster.storage.lease import LeaseHeld

# StorageError: an object store unreachable past every retry (the message names the URL);
# LeaseHeld: another live driver runs the sweep (the message names it)
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                StorageError, LeaseHeld)
DEBUG_ENV = "MEDSSL_DEBUG"


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` on the command line, or ``MEDSSL_DEBUG`` set to anything but 0/empty."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report_input_errors(command: Callable[[], int], debug: bool = False) -> int:
    """Run ``command``; an input error becomes one line on stderr and exit status 2."""
    try:
        return command()
    except INPUT_ERRORS as exc:
        if debug_requested(debug):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2


def error_line(exc: BaseException) -> str:
    """The message of ``exc``; for an error raised in a DataLoader worker (which torch
    re-raises with the worker's whole traceback as its message), the original one."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    kind, _, message = last.partition(": ")
    return message if message and " " not in kind else last
