"""Where a fine-tuning run's folder lives: a local path, or an ``s3://`` URL.

A run whose ``out`` is a URL trains in a node-local copy of its folder
(:func:`cluster.storage.mirror.local_folder_for`: ``$MEDSSL_LOCAL_RUNS`` or the temp
folder). Before training, the copy is replaced by what the store holds, so a run (or a
sweep trial) started on another node continues from its last uploaded epoch. After each
epoch that saved ``last.pt``, the folder's changes go up with ``last.pt`` and then
``metrics.json`` last; at the end ``metrics.json`` marked complete goes up last and only
then is ``last.pt`` removed from the store: whoever reads the store sees either a run
that can continue or a complete one, never neither.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cluster.storage import is_url, local_path
from cluster.storage.mirror import FolderMirror, local_folder_for
from cluster.storage.urls import normalize
from finetune.run_checkpoint import LAST_CHECKPOINT
from finetune.run_metrics import METRICS_FILE, RunMetrics, read_run_metrics


class RunFolder:
    """A run folder's local working path and, for a URL, its mirror in the store."""

    def __init__(self, out: str | Path) -> None:
        self.out = normalize(out)
        self.mirror: FolderMirror | None = None
        if is_url(self.out):
            self.local = local_folder_for(self.out)
            self.mirror = FolderMirror(self.local, self.out)
        else:
            self.local = local_path(self.out)

    @property
    def remote(self) -> bool:
        return self.mirror is not None

    def stored_metrics(self) -> RunMetrics | None:
        """The run's ``metrics.json`` where it lives (the store, for a URL); None if none."""
        try:
            return read_run_metrics(self.out)
        except FileNotFoundError:
            return None

    def open(self) -> Path:
        """The local folder to train in; for a URL, a fresh copy of what the store holds."""
        if self.mirror is not None:
            self.mirror.pull()
        return self.local

    def epoch_saved(self, checkpointed: bool) -> None:
        """Upload the folder after an epoch that saved ``last.pt`` (others wait for it:
        a restart continues from ``last.pt`` alone)."""
        if self.mirror is not None and checkpointed:
            self.mirror.push(commit=[LAST_CHECKPOINT, METRICS_FILE])

    def finished(self) -> None:
        """Upload the finished run; its ``last.pt`` leaves the store after the complete
        ``metrics.json`` is there."""
        if self.mirror is not None:
            self.mirror.push(commit=[METRICS_FILE])

    def close(self) -> None:
        """Drop the node-local copy of a run kept in a store (a sweep's node trains
        hundreds of runs; each copy holds weights and a checkpoint)."""
        if self.mirror is not None:
            shutil.rmtree(self.local, ignore_errors=True)

    def upload(self, *names: str) -> None:
        """Upload these files now (small records a restart elsewhere must see)."""
        if self.mirror is not None:
            self.mirror.push(only=names)
