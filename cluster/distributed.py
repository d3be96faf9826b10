"""Process-group set-up from the environment torchrun provides."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(prefer_cuda: bool = True, timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    NCCL with one GPU per process when CUDA is present, gloo on CPU. A plain
    ``python -m`` launch is a world of one and creates no process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = prefer_cuda and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # A bounded timeout turns a hung collective (or a hung connection set-up after an
        # elastic restart) into an error, which torchrun answers with another restart.
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        store = _own_store(rank, world_size, timeout)
        backend = "nccl" if use_cuda else "gloo"
        if store is not None:
            dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=rank,
                                    world_size=world_size)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _own_store(rank: int, world_size: int,
               timeout: datetime.timedelta | None) -> dist.Store | None:
    """The process group's store, served by rank 0 on MASTER_ADDR only; None: use torch's.

    torchrun's agents share their rendezvous store with the workers unless
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (medssl's launch recipes set it). That shared
    store outlives a restart, and a restarted group then reads the dead group's connection
    keys and hangs (seen with gloo and torch 2.14). With sharing off, rank 0 of every
    (re)start serves a fresh store; torch would bind it on every interface, so it is
    bound here to the address the other ranks are told (MASTER_ADDR).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or \
            "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    wait = timeout or datetime.timedelta(minutes=30)
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=wait)
    try:
        server = socket.create_server((host, port), family=_family(host))
    except OSError:
        return None  # MASTER_ADDR is not an address of this host: torch's default binding
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=wait,
                         master_listen_fd=server.detach())


def _family(host: str) -> socket.AddressFamily:
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if dist.is_initialized():  # a world of one may have one too (the DeepSpeed backend)
        dist.destroy_process_group()
