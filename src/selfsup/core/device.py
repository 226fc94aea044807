"""The device a command runs on, and what runs on it: mixed precision, waiting for queued work."""
from __future__ import annotations

import contextlib

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """`train.device` (auto, cpu, cuda, cuda:N) as a device; auto is CUDA where there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name}: CUDA is not available on this machine (use cpu)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"train.device={name}: expected auto, cpu or cuda")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """`train.precision`: bf16 autocasts on `device`; fp32 changes nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise UserError(f"train.precision={precision}: expected fp32 or bf16")
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (for timing); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
