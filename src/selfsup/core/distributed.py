"""The process group torchrun describes, and collectives that are the identity in a single process.

`torchrun --nproc-per-node N -m selfsup train ...` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init` joins that group: NCCL on CUDA (one GPU per process), gloo on the CPU. The wrappers of a
method (DDP, FSDP2, BatchNorm over the global batch) are training/distributed.py's.
"""
from __future__ import annotations

import gc
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group when WORLD_SIZE > 1; returns this process's device (cuda:LOCAL_RANK on
    GPUs). Only rank 0 logs below the error level."""
    if not enabled() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not enabled():
        # an hour before a collective times out: the others wait while rank 0 evaluates or writes a checkpoint
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    if not is_main():
        logging.getLogger("selfsup").setLevel(logging.ERROR)
    return device


def shutdown() -> None:
    """Destroy the process group once nothing else holds it. Drop DDP wrappers first (`Trainer.close`): a DDP
    reducer holding the group's last reference destroys it with the GIL held, and gloo's worker thread, freeing
    a finished all-reduce's tensors, then waits for the GIL forever."""
    if enabled():
        gc.collect()  # wrappers in reference cycles
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the identity in a single process."""
    if enabled():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place; the identity in a single process."""
    if enabled():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0 (rank order), without gradient (keys of a momentum encoder)."""
    if not enabled():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and returns this rank's share, so a loss
    over the global batch (SimCLR's negatives) sends gradients to the rank that made each embedding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(world_size())[rank()]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0 (equal shapes on all ranks), differentiable; x itself with
    no process group."""
    return _GatherWithGrad.apply(x) if enabled() else x


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of per-rank values (each rank's mean over its equal share is a global mean)."""
    return all_reduce_sum(x) / world_size()


def min_over_ranks(n: int) -> int:
    if not enabled():
        return n
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None  # NCCL: GPU tensors
    t = torch.tensor([n], dtype=torch.int64, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)
