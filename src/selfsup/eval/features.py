"""Frozen features of a labelled source: computed once per (backbone, data) and reused by every protocol."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.sources import Source, TensorSource
from ..data.views import eval_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_images(source: Source, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch: int = 256):
    """Yields (normalised images [b, 3, size, size], labels [b]) over the whole source, in order."""
    if isinstance(source, TensorSource):  # same-size images: transform a whole batch at once
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        labels = source.labels()
        for i in range(0, len(source), batch):
            x = source.images[i : i + batch].float() / 255.0
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            if x.shape[-1] != size or x.shape[-2] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            yield (x - m) / s, labels[i : i + batch]
        return
    for i in range(0, len(source), batch):
        items = [source[j] for j in range(i, min(i + batch, len(source)))]
        yield torch.stack([eval_transform(img, size, mean, std) for img, _ in items]), torch.tensor([l for _, l in items])


@torch.no_grad()
def extract(forward: Callable[[torch.Tensor], torch.Tensor], source: Source, size: int,
            device: torch.device | str = "cpu", batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] (float32, on the CPU) and labels [N] of every image of `source`."""
    feats, labels = [], []
    for x, y in eval_images(source, size, batch=batch):
        feats.append(forward(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def backbone_features(backbone: nn.Module, source: Source, size: int, device="cpu", batch: int = 256):
    """[CLS] features of a backbone in eval mode."""
    was_training = backbone.training
    backbone.eval()
    try:
        return extract(backbone, source, size, device, batch)
    finally:
        backbone.train(was_training)


def pixel_features(source: Source, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels as features (the k-NN baseline): the normalised image, flattened."""
    return extract(lambda x: x.flatten(1), source, size)
