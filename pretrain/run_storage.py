"""Where a pretraining run's folder lives: a local path, or an ``s3://`` URL.

With ``run.out=s3://...`` every process works in a node-local copy of the run folder
(``run.local_dir``, see :func:`cluster.storage.mirror.local_folder_for`). Before training,
one process per node replaces that copy by what the store holds, so a run restarted on a
fresh machine continues from its last uploaded checkpoint. After each checkpoint the
changes go up: each rank's optimizer shard (DeepSpeed ZeRO) by that rank, as its node
may be the only one holding it; then everything else from rank 0, ``last.pt`` last, so
the store never holds a ``last.pt`` whose shards are missing.
"""

from __future__ import annotations

import re
from pathlib import Path

from cluster.distributed import DistInfo, barrier
from cluster.storage import is_url, join, local_path
from cluster.storage.mirror import FolderMirror, local_folder_for
from cluster.storage.objects import copy, delete, download, list_files
from pretrain.checkpoint import CHECKPOINT_DIR, LATEST, shard_name
from pretrain.checkpoint_state import read_checkpoint

# per-rank optimizer shards: checkpoints/<folder>/rankNNNNN.pt
_RANK_FILE = re.compile(rf"{CHECKPOINT_DIR}/[^/]+/rank\d{{5}}\.pt")
# kept end-of-epoch copies and their shards: not needed to resume, fetched when asked for
_KEPT = re.compile(rf"{CHECKPOINT_DIR}/epoch\d{{4,}}(\.pt|-zero/.*)")


class RunStorage:
    """The run folder's local working path and, for a URL, its mirror in the store."""

    def __init__(self, out: str, local_dir: str = "") -> None:
        self.out = out
        self.mirror: FolderMirror | None = None
        if is_url(out):
            self.local = local_folder_for(out, local_dir)
            self.mirror = FolderMirror(self.local, out)
        else:
            self.local = local_path(out)

    def open(self, dist: DistInfo) -> Path:
        """The local run folder, holding the store's copy when the run lives there."""
        if self.mirror is not None:
            if dist.local_rank == 0:
                fetched = self.mirror.pull(skip=lambda name: bool(_KEPT.fullmatch(name)))
                fetched += self._fetch_named_shards()
                if dist.is_main and fetched:
                    print(f"fetched {len(fetched)} files of {self.out} into {self.local}",
                          flush=True)
            barrier(dist)
        return self.local

    def _fetch_named_shards(self) -> list[str]:
        """The optimizer shards ``last.pt`` points at, when they are a kept copy's (a run
        restarted from a kept epoch: its ``epochNNNN.pt`` copied to ``last.pt``)."""
        latest = self.local / CHECKPOINT_DIR / LATEST
        # memory-mapped: only the few fields read here come off the disk
        checkpoint = read_checkpoint(latest, mmap=True) if latest.is_file() else None
        if checkpoint is None or not checkpoint.zero_shards or \
                (self.local / CHECKPOINT_DIR / checkpoint.zero_shards).is_dir():
            return []
        prefix = f"{CHECKPOINT_DIR}/{checkpoint.zero_shards}/"
        names = [name for name in list_files(self.out) if name.startswith(prefix)]
        for name in names:
            download(join(self.out, name), self.local / name)
        return names

    def checkpoint_saved(self, dist: DistInfo, shards: str | None, kept: str | None) -> None:
        """Upload the checkpoint just saved (all ranks call it)."""
        if self.mirror is None:
            return
        checkpoints = join(self.out, CHECKPOINT_DIR)
        if shards:
            self.mirror.push(only=[f"{CHECKPOINT_DIR}/{shards}/{shard_name(dist.rank)}"])
            barrier(dist)
        if dist.is_main:
            if shards and kept:  # the kept copy's shards, copied inside the store
                kept_shards = f"{Path(kept).stem}-zero"
                for rank in range(dist.world_size):
                    copy(join(checkpoints, shards, shard_name(rank)),
                         join(checkpoints, kept_shards, shard_name(rank)))
            commit = [f"{CHECKPOINT_DIR}/{name}" for name in (kept, LATEST) if name]
            self.mirror.push(commit=commit, skip=lambda name: bool(_RANK_FILE.fullmatch(name)))
            # shard folders no checkpoint points at any more (each rank wrote its own)
            for name in list_files(checkpoints):
                folder = name.split("/", 1)[0]
                if folder.startswith("zero-step") and folder != shards:
                    delete(join(checkpoints, name))
        barrier(dist)

    def finished(self, dist: DistInfo) -> None:
        """Upload what the end of the run wrote (the export, the last logs)."""
        if self.mirror is not None and dist.is_main:
            self.mirror.push(skip=lambda name: bool(_RANK_FILE.fullmatch(name)))
        barrier(dist)
