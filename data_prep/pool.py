"""Run jobs in a process pool sized to the machine, in-process for one worker."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def worker_count(requested: int, jobs: int) -> int:
    """``requested`` processes (0: one per CPU core), never more than there are jobs."""
    return max(1, min(requested or os.cpu_count() or 1, jobs))


def run_jobs(function: Callable[..., T], jobs: Sequence[tuple[Any, ...]], workers: int, *,
             desc: str, progress: bool, initializer: Callable[..., None] | None = None,
             initargs: tuple[Any, ...] = ()) -> list[T]:
    """``[function(*job) for job in jobs]``, in order, over ``workers`` processes.

    Workers are spawned (no threads or locks inherited from the caller); the first error
    cancels the jobs not yet started and is raised here, as raised in the worker.
    """
    workers = worker_count(workers, len(jobs))
    with tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress) as bar:
        if workers == 1:
            if initializer is not None:
                initializer(*initargs)
            results = []
            for job in jobs:
                results.append(function(*job))
                bar.update()
            return results
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                 initargs=(os.getpid(), initializer, initargs)) as pool:
            futures = [pool.submit(function, *job) for job in jobs]
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            try:
                return [future.result() for future in futures]
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _start_worker(parent: int, initializer: Callable[..., None] | None,
                  initargs: tuple[Any, ...]) -> None:
    exit_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent: int) -> None:
    """End this worker when the process that started it dies, even by SIGKILL.

    A pool's workers otherwise outlive a killed parent (each holding its memory) until
    someone kills them by hand. On Linux the kernel delivers SIGKILL on the parent's
    death (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread watches the parent.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
