"""Run a function on N local gloo processes (what Ray Train sets up per worker), for DDP tests."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args) -> None:
    """`fn(*args)` on `world` processes with torch.distributed initialised (gloo, CPU)."""
    mp.start_processes(_worker, args=(world, _free_port(), fn, args), nprocs=world, join=True,
                       start_method="spawn")
