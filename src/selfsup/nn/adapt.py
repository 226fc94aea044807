"""Pretrained weights into a backbone with another number of input channels: the first convolution's weight
(ViT `patch_embed.proj.weight`, ResNet `conv1.weight`) is adapted, everything else loads as it is."""
from __future__ import annotations

import math

import torch

INPUT_CONVS = ("patch_embed.proj.weight", "conv1.weight")  # the keys of a backbone's first convolution


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A conv weight [out, C, kh, kw] for `in_chans` inputs, as timm's `adapt_input_conv` does
    (timm/models/_manipulate.py): 1 channel takes the sum over the C input weights (a gray image then gives what
    its C-fold copy gave); more take the weights repeated ceil(in_chans / C) times, the first in_chans kept, scaled
    by C / in_chans (the responses keep their scale). Computed in float32, returned in the weight's dtype."""
    c = weight.shape[1]
    if in_chans == c:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_chans / c), 1, 1)[:, :in_chans] * (c / in_chans)
    return w.to(weight.dtype)


def adapt_input_channels(state: dict[str, torch.Tensor], in_chans: int) -> dict[str, torch.Tensor]:
    """A backbone's state dict with its first convolution adapted to `in_chans` inputs (a copy; the same dict when
    nothing changes)."""
    found = [k for k in INPUT_CONVS if k in state and state[k].shape[1] != in_chans]
    if not found:
        return state
    return {**state, **{k: adapt_input_conv(state[k], in_chans) for k in found}}
