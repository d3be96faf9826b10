"""What a pretraining run shows while it trains: the progress bar, and TensorBoard scalars
every ``run.log_every`` optimizer steps (loss, schedules, throughput, collapse watch).

Reading the loss is a host sync (it waits for the device), so it happens only here, when
a log is due; the engine checks every other step's loss one step late.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from pretrain.methods import SSLMethod


class LoggedViews(Protocol):
    """The loader side of a step, as the logs see it (``engine._ViewSource``)."""

    last: tuple[torch.Tensor, torch.Tensor] | None  # the last micro batch of view pairs
    wait_s: float  # seconds spent waiting for batches since the last log


class StepLogger:
    """Logs each optimizer step: the bar moves every step, the scalars are written every
    ``log_every`` steps and at step 1. Throughput covers the time since the last log, less
    the time the engine spent on other work (:meth:`exclude`)."""

    def __init__(self, writer: SummaryWriter | None, bar: tqdm, method: SSLMethod, *,
                 log_every: int, global_batch: int, steps_per_epoch: int,
                 launch_step: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.writer, self.bar, self.method = writer, bar, method
        self.log_every, self.global_batch = log_every, global_batch
        self.steps_per_epoch = steps_per_epoch
        self.launch_step = launch_step  # this process's first step shows its view pairs
        self.clock = clock
        self.last_log, self.steps_since_log = clock(), 0

    def exclude(self, seconds: float) -> None:
        """Keep ``seconds`` of work that is not training (the live probe) out of the
        throughput figures."""
        self.last_log += seconds

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == 1

    def after_step(self, step: int, *, epoch: int, progress: int, lr: float, momentum: float,
                   views: LoggedViews, loss: Callable[[], float]) -> None:
        """Log optimizer step ``step`` (already counted), taken at ``progress`` steps into
        the run's epochs; ``loss()`` checks and returns its loss, called only when a log
        is due."""
        self.steps_since_log += 1
        self.bar.update(1)
        if self.writer is not None and step == self.launch_step + 1 and views.last is not None:
            log_view_pairs(self.writer, *views.last, step)
        if not self.due(step):
            return
        loss_value = loss()
        self.bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.4f}")
        if self.writer is not None:
            self._write_scalars(self.writer, step, loss_value, progress=progress, lr=lr,
                                momentum=momentum, views=views)
        self.last_log, self.steps_since_log = self.clock(), 0
        views.wait_s = 0.0

    def _write_scalars(self, writer: SummaryWriter, step: int, loss_value: float, *,
                       progress: int, lr: float, momentum: float, views: LoggedViews) -> None:
        elapsed = self.clock() - self.last_log
        views_per_s = 2 * self.global_batch * self.steps_since_log / elapsed
        writer.add_scalar("train/loss", loss_value, step)
        writer.add_scalar("train/lr", lr, step)
        writer.add_scalar("train/epoch", progress / self.steps_per_epoch, step)  # at its start
        if self.method.uses_momentum:
            writer.add_scalar("train/tau", momentum, step)
        writer.add_scalar("perf/views_per_s", views_per_s, step)
        writer.add_scalar("perf/data_wait_fraction", views.wait_s / elapsed, step)
        if views.last is None:
            return
        spread = embedding_std(self.method, views.last[0])
        if torch.isfinite(spread).all():  # diverged weights fail the next loss check
            writer.add_histogram("collapse/embedding_std", spread, step)


@torch.no_grad()
def embedding_std(method: SSLMethod, views: torch.Tensor) -> torch.Tensor:
    """Per-dimension std of normalised projections: values near 0 signal collapse."""
    was_training = method.training
    method.eval()
    projections = method.embed(views[:64].float())
    method.train(was_training)
    return torch.nn.functional.normalize(projections, dim=1).std(dim=0).cpu()


def log_view_pairs(writer: SummaryWriter, view1: torch.Tensor, view2: torch.Tensor,
                   step: int, count: int = 8) -> None:
    pairs = torch.stack([view1[:count], view2[:count]], dim=1).flatten(0, 1).float().cpu()
    low = pairs.amin(dim=(1, 2, 3), keepdim=True)
    high = pairs.amax(dim=(1, 2, 3), keepdim=True)
    writer.add_images("views/pairs", (pairs - low) / (high - low + 1e-6), step)
