"""PyTorch's own distributed stack, thinly: the process group torchrun describes, DDP or FSDP2 around a method,
BatchNorm over the global batch, and reductions that are the identity in a single process.

`torchrun --nproc-per-node N -m selfsup train ...` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init` joins that group: NCCL on CUDA (one GPU per process), gloo on the CPU.
"""
from __future__ import annotations

import gc
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError

WRAPPERS = ("ddp", "fsdp")


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


class _SumWithGrad(torch.autograd.Function):
    """All-reduce sum whose backward is the all-reduce sum of the gradients (each rank's loss depends on
    every rank's input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone())


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch of all ranks, for backends
    `torch.nn.SyncBatchNorm` does not run on (gloo on the CPU). Gradients flow through the all-reduce, so
    with DDP's averaging they equal those of one process holding the whole batch."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = all_reduce_sum(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
        mean = _SumWithGrad.apply(x.sum(dims)) / n
        xc = x - mean.view(shape)
        var = _SumWithGrad.apply((xc * xc).sum(dims)) / n  # biased, as BatchNorm normalises with
        y = xc * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), m)
        return y


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `module` normalises over the global batch: torch's SyncBatchNorm on CUDA,
    `GlobalBatchNorm` elsewhere. Unchanged in a single process."""
    if not enabled():
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child, device))
    return module


def sharded(module: nn.Module) -> bool:
    """Whether FSDP has split the module's parameters over the ranks."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state(method: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The state dicts of a method (and its optimiser) with whole tensors. Under FSDP they are gathered from
    every rank onto rank 0's CPU (all ranks must call; the others get empty dicts)."""
    if not sharded(method):
        return method.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(method, options=opts)
    return model, get_optimizer_state_dict(method, optimizer, options=opts) if optimizer is not None else None


def load_full_state(method: nn.Module, optimizer: torch.optim.Optimizer, model: dict, optim: dict) -> None:
    """The inverse of `full_state`: every rank passes the whole state and keeps its own shard of it."""
    if not sharded(method):
        method.load_state_dict(model)
        optimizer.load_state_dict(optim)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(method, model, options=StateDictOptions(full_state_dict=True))
    # parameters that never had a gradient (the mask token outside iBOT) have no optimiser state
    set_optimizer_state_dict(method, optimizer, optim, options=StateDictOptions(full_state_dict=True, strict=False))


def wrap(method: nn.Module, kind: str, device: torch.device) -> nn.Module:
    """What the trainer calls forward on: the method itself in one process; DDP (gradients averaged over
    ranks) or FSDP2 (`fully_shard` on every transformer block, then the whole method) in several."""
    if kind not in WRAPPERS:
        raise UserError(f"train.distributed={kind}: expected one of {', '.join(WRAPPERS)}")
    if not enabled():
        return method
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in list(method.modules()):
            if isinstance(getattr(m, "blocks", None), nn.ModuleList):
                for block in m.blocks:
                    fully_shard(block)
        return fully_shard(method)
    ids = [device.index] if device.type == "cuda" else None
    # buffers (DINO's centre, BatchNorm statistics) are kept equal on every rank by all-reduces, not broadcast;
    # some parameters sit out some methods (the ViT's mask token outside iBOT)
    return nn.parallel.DistributedDataParallel(method, device_ids=ids, forward_sync_buffers=False,
                                               find_unused_parameters=True)
