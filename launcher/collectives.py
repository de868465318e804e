"""torch.distributed helpers: which rank is the source, and moving bytes and small objects from it.

The source rank (global rank 0) is the one that reads and quantizes the checkpoint; every other
rank receives from it (see launcher.strategies.handoff). Without a process group (one process)
every helper is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

SOURCE_RANK = 0


def this_rank_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def is_source_rank() -> bool:
    if dist.is_initialized():
        return dist.get_rank() == SOURCE_RANK
    return int(os.environ.get("RANK", "0")) == SOURCE_RANK


def broadcast_object(obj):
    """Sends a small picklable object from the source rank to all ranks."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=SOURCE_RANK)
    return box[0]


def comm_device(device: torch.device) -> torch.device:
    """Where a tensor must be to travel: NCCL moves CUDA tensors only, gloo CPU tensors."""
    if not dist.is_initialized() or dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def broadcast_tensor_(tensor: torch.Tensor) -> None:
    """In-place broadcast from the source rank, bit for bit (as bytes, so any dtype travels)."""
    flat = tensor.view(-1)
    dist.broadcast(flat.view(torch.uint8) if flat.numel() else flat, src=SOURCE_RANK)


def scatter_rows_(local: torch.Tensor, full: torch.Tensor | None, full_rows: int) -> None:
    """Fills this rank's dim-0 chunk `local` (torch.chunk layout, as FSDP2 shards) from the source rank's `full`."""
    world, rank = dist.get_world_size(), dist.get_rank()
    rows_per_rank = -(-full_rows // world)
    row_shape = local.shape[1:]
    device = comm_device(local.device)
    received = torch.empty((rows_per_rank, *row_shape), dtype=local.dtype, device=device)
    chunks = None
    if rank == SOURCE_RANK:
        chunks = []
        for r in range(world):
            piece = full[r * rows_per_rank : (r + 1) * rows_per_rank].to(device)
            padded = torch.zeros((rows_per_rank, *row_shape), dtype=local.dtype, device=device)
            padded[: piece.shape[0]] = piece
            chunks.append(padded.view(-1).view(torch.uint8))
    dist.scatter(received.view(-1).view(torch.uint8), chunks, src=SOURCE_RANK)
    with torch.no_grad():
        local.copy_(received[: local.shape[0]].to(local.device))
