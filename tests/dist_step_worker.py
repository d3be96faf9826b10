"""One rank of the distributed-equality test (run by torchrun from test_distributed_step).

Every rank builds the same method (same seed), converts BatchNorm to the global kind,
wraps it in DDP, runs one step's forward and backward on its half of a fixed batch and
saves its loss and the DDP-averaged gradients.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from cluster.distributed import init_distributed, shutdown
from pretrain.sync_batchnorm import convert_sync_batchnorm
from tests.test_distributed_step import BATCH, build, fixed_views


def main(out: Path, names: list[str]) -> None:
    info = init_distributed(prefer_cuda=False)
    torch.set_num_threads(1)
    view1, view2 = fixed_views()
    half = BATCH // info.world_size
    rows = slice(info.rank * half, (info.rank + 1) * half)
    for name in names:
        method = convert_sync_batchnorm(build(name), "cpu")
        ddp = DistributedDataParallel(method)
        loss = ddp(view1[rows], view2[rows])
        loss.backward()
        grads = {key: p.grad for key, p in method.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads}, out / f"{name}-rank{info.rank}.pt")
    shutdown(info)


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main(Path(sys.argv[1]), sys.argv[2:])
