"""Data-parallel training across processes and machines with ``torch.distributed``.

``torchrun --nproc-per-node N [--nnodes M ...] -m convspec train ...`` sets
RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` sees them, joins the process
group (NCCL when each rank has a GPU, gloo otherwise) and says which device
this rank uses.  Without them it is a single process and nothing changes.
Each rank reads every ``world``-th image of each global batch
(``loader.Batches``), ``DistributedDataParallel`` averages the gradients, and
only rank 0 prints and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(backend: str | None = None) -> Cluster:
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return Cluster()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > local_rank else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Cluster(rank, world, local_rank, backend)


def rank_device(cluster: Cluster) -> torch.device:
    """The device of this rank when data parallel: its local GPU, or the CPU."""
    if cluster.backend == "nccl":
        return torch.device(f"cuda:{cluster.local_rank}")
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """Sum over ranks (in place for CPU tensors); NCCL only reduces GPU tensors."""
    if not cluster.distributed:
        return tensor
    if cluster.backend == "nccl":
        on_gpu = tensor.to(rank_device(cluster))
        dist.all_reduce(on_gpu)
        tensor.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(tensor)
    return tensor


def broadcast_flag(flag: bool, cluster: Cluster) -> bool:
    """True on every rank if any rank says so (a signal or a NaN on one rank stops all)."""
    if not cluster.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    all_reduce_sum(t, cluster)
    return bool(t.item())


def barrier(cluster: Cluster) -> None:
    if cluster.distributed:
        dist.barrier()


def teardown(cluster: Cluster) -> None:
    if cluster.distributed and dist.is_initialized():
        dist.destroy_process_group()
