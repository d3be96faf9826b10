"""Keeping several reads in flight while the caller decodes what has arrived.

An object store answers each request after tens of milliseconds whatever its size; a
reader that waits on one request at a time spends most of its time waiting. Reads run
in a small thread pool (they release the GIL in sockets and file I/O) and come back in
the order they were asked for, so the sample stream is the same as a serial read's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: Iterable[T], fetch: Callable[[T], R],
               depth: int) -> Iterator[tuple[T, R]]:
    """``(item, fetch(item))`` for every item in order, with up to ``depth`` fetches
    running ahead of the consumer; ``depth <= 1`` fetches one at a time, inline.

    The first failing fetch raises here, in order; fetches queued behind it are
    cancelled rather than waited for.
    """
    if depth <= 1:
        for item in items:
            yield item, fetch(item)
        return
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="read-ahead")
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fetch, item)))
            if len(pending) >= depth:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
