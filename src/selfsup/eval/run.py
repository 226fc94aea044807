"""Evaluation entry points shared by `selfsup train` (periodic and final k-NN) and `selfsup eval knn`."""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..data.builtin import open_source
from ..data.sources import Source
from ..errors import UserError
from ..nn import backbone_from_config
from .features import backbone_features, pixel_features
from .knn import knn_accuracy


def labelled_splits(spec: str) -> tuple[Source, Source]:
    """The train and test splits of a labelled source; a clear error for unlabelled data."""
    train, test = open_source(spec, "train"), open_source(spec, "test")
    if not train.labelled:
        raise UserError(f"{spec}: no labels (evaluation needs a built-in set, or a folder with one subfolder per class)")
    return train, test


def knn_of(forward_features, train: Source, test: Source, k: int | list[int], temperature: float) -> dict:
    """Top-1/top-5 of weighted k-NN for one k, or a table {k: {...}} for several, from one feature pass."""
    xtr, ytr = forward_features(train)
    xte, yte = forward_features(test)
    ks = k if isinstance(k, list) else [k]
    table = {kk: knn_accuracy(xtr, ytr, xte, yte, kk, temperature) for kk in ks}
    return table if isinstance(k, list) else table[k]


def knn_of_backbone(backbone: nn.Module, cfg: Config, device: torch.device, k: int | None = None) -> dict | None:
    """k-NN of a backbone on the run's labelled data (None when the data has no labels)."""
    spec = cfg.data.eval_source or cfg.data.source
    if not open_source(spec).labelled:
        return None
    train, test = labelled_splits(spec)
    size = cfg.crops.global_size
    return knn_of(lambda s: backbone_features(backbone, s, size, device), train, test, k or cfg.eval.k,
                  cfg.eval.temperature)


def final_table(backbone: nn.Module, cfg: Config, device: torch.device) -> dict | None:
    """The trained backbone's k-NN beside two baselines: the same architecture at random init, raw pixels."""
    trained = knn_of_backbone(backbone, cfg, device)
    if trained is None:
        return None
    torch.manual_seed(cfg.train.seed)
    random_init = backbone_from_config(cfg.backbone, drop_path=0.0).to(device)
    spec = cfg.data.eval_source or cfg.data.source
    train, test = labelled_splits(spec)
    return {
        "trained": trained,
        "random_init": knn_of_backbone(random_init, cfg, device),
        "raw_pixels": knn_of(lambda s: pixel_features(s, cfg.crops.global_size), train, test, cfg.eval.k,
                             cfg.eval.temperature),
    }
