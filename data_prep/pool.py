"""Run jobs in a process pool sized to the machine, in-process for one worker."""

from __future__ import annotations

import multiprocessing
import os
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
        with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer,
                                 initargs=initargs) as pool:
            futures = [pool.submit(function, *job) for job in jobs]
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            try:
                return [future.result() for future in futures]
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
