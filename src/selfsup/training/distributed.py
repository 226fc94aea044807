"""PyTorch's own distributed stack around a method: DDP or FSDP2, BatchNorm over the global batch, and the
whole state of a sharded method. The process group and its collectives are core/distributed.py's.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.distributed import all_reduce_sum, enabled, world_size
from ..core.errors import UserError

WRAPPERS = ("ddp", "fsdp")


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
    from torch.distributed.tensor import (
        DTensor,  # here and below: absent where torch lacks distributed
    )

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state(method: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The state dicts of a method (and its optimiser) with whole tensors. Under FSDP they are gathered from
    every rank onto rank 0's CPU (all ranks must call; the others get empty dicts)."""
    if not sharded(method):
        return method.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(method, options=opts)
    return model, get_optimizer_state_dict(method, optimizer, options=opts) if optimizer is not None else None


def load_full_state(method: nn.Module, optimizer: torch.optim.Optimizer, model: dict, optim: dict) -> None:
    """The inverse of `full_state`: every rank passes the whole state and keeps its own shard of it."""
    if not sharded(method):
        method.load_state_dict(model)
        optimizer.load_state_dict(optim)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

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
