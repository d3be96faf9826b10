"""``torchrun`` whose servers listen on 127.0.0.1 only (tests, one-machine benchmarks).

torch's TCPStore (the c10d rendezvous store and the agents' store) binds every interface
even when given 127.0.0.1, and no torchrun option changes that; its one supported
control is ``master_listen_fd``, a socket bound by the caller. This wrapper binds each
store to 127.0.0.1 that way, then runs torchrun's own ``main`` with the same arguments:
``python -m cluster.loopback_torchrun --nnodes=1 ... -m pretrain ...``.
"""

from __future__ import annotations

import datetime
import socket
import sys

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend
from torch.distributed.run import main


class LoopbackTCPStore(dist.TCPStore):
    def __init__(self, host_name, port, world_size=None, is_master=False,
                 timeout=datetime.timedelta(seconds=300), wait_for_workers=True,
                 multi_tenant=False, master_listen_fd=None, use_libuv=True):
        if is_master and master_listen_fd is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen(128)
            except OSError as exc:
                sock.close()
                raise RuntimeError(f"cannot listen on 127.0.0.1:{port}: {exc}") from exc
            port = sock.getsockname()[1]
            master_listen_fd = sock.detach()
        super().__init__(host_name, port, world_size, is_master, timeout,
                         wait_for_workers, multi_tenant, master_listen_fd, use_libuv)


if __name__ == "__main__":
    # Deliberate monkeypatch of torch's class; mypy forbids assigning to a type.
    dist.TCPStore = LoopbackTCPStore  # type: ignore[misc]
    c10d_rendezvous_backend.TCPStore = LoopbackTCPStore  # type: ignore[misc]
    sys.exit(main())
