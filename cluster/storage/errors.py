"""The one error object storage raises once retries are spent."""

from __future__ import annotations


class StorageError(OSError):
    """An object store kept failing (unreachable, timing out, 5xx) past every retry.

    An ``OSError``: a command answers it with one ``error:`` line naming the URL and exit
    status 2, as it does a missing file (``cluster.cli_errors``).
    """
