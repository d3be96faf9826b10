"""Timing for the benchmarks: warm up, then repeat; CUDA events on a GPU."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_runs(step: Callable[[], object], steps: int, warmup: int, repeats: int,
               device: torch.device) -> list[float]:
    """Seconds of each of ``repeats`` runs of ``steps`` calls of ``step``, after ``warmup``
    untimed calls (which include compilation). On a GPU the work is timed with CUDA
    events after synchronising, so queued kernels count where they run."""
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            begin.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            seconds.append(begin.elapsed_time(end) / 1000)
        else:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds.append(time.perf_counter() - start)
    return seconds
