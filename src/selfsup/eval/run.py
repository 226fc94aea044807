"""Evaluation entry points shared by `selfsup train` (periodic and final k-NN) and `selfsup eval`."""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config, eval_size
from ..data.builtin import labelled_splits, open_source
from ..data.dense import IGNORE
from ..data.scenes import SceneSet
from ..data.sources import Source
from ..nn import backbone_from_config
from ..nn.vit import VisionTransformer
from .attention_masks import attention_jaccard
from .cache import FeatureCache
from .dense_features import dense_features
from .features import Features, backbone_features, pixel_features
from .knn import knn_accuracy


def knn_of(forward_features, train: Source, test: Source, k: int | list[int], temperature: float, desc: str) -> dict:
    """Top-1/top-5 of weighted k-NN for one k, or a table {k: {...}} for several, from one feature pass;
    `forward_features(source, desc)` with `desc` + ':train' or ':test' for the progress lines."""
    xtr, ytr = forward_features(train, f"{desc}:train")
    xte, yte = forward_features(test, f"{desc}:test")
    return knn_accuracy(xtr, ytr, xte, yte, k, temperature)


def knn_of_backbone(backbone: nn.Module, cfg: Config, device: torch.device, k: int | None = None,
                    what: str = "k-NN features") -> dict | None:
    """k-NN of a backbone on the run's labelled data (None when the data has no labels)."""
    spec = cfg.data.eval_source or cfg.data.source
    if not open_source(spec).labelled:
        return None
    train, test = labelled_splits(spec)
    size = eval_size(cfg)

    def forward(s: Source, desc: str):
        return backbone_features(backbone, s, size, device, mean=cfg.crops.mean, std=cfg.crops.std, desc=desc)

    return knn_of(forward, train, test, k or cfg.eval.k, cfg.eval.temperature, f"{what} {spec}")


def final_table(backbone: nn.Module, cfg: Config, device: torch.device) -> dict | None:
    """The trained backbone's k-NN beside two baselines: the same architecture at random init, raw pixels."""
    trained = knn_of_backbone(backbone, cfg, device, what="k-NN features (trained)")
    if trained is None:
        return None
    torch.manual_seed(cfg.train.seed)
    random_init = backbone_from_config(cfg.backbone, drop_path=0.0).to(device)
    spec = cfg.data.eval_source or cfg.data.source
    train, test = labelled_splits(spec)
    return {
        "trained": trained,
        "random_init": knn_of_backbone(random_init, cfg, device, what="k-NN features (random init)"),
        "raw_pixels": knn_of(lambda s, desc: pixel_features(s, eval_size(cfg), desc, cfg.crops.mean, cfg.crops.std),
                             train, test, cfg.eval.k, cfg.eval.temperature, f"k-NN raw pixels {spec}"),
    }


def attention_table(backbone: nn.Module, cfg: Config, device: torch.device) -> dict | None:
    """Jaccard of the 60 %-mass [CLS] attention masks with the objects of the test scenes (DINO Fig. 4), for the
    trained ViT and the same one at random init; None unless the run's data has object masks (`scenes`)."""
    if (cfg.data.eval_source or cfg.data.source) != "scenes" or not isinstance(backbone, VisionTransformer):
        return None
    test = SceneSet("test")
    torch.manual_seed(cfg.train.seed)
    out = {}
    for name, net in (("trained", backbone), ("random_init", backbone_from_config(cfg.backbone, drop_path=0.0))):
        f = dense_features(net, test, "scenes", "test", eval_size(cfg), 1, cfg.crops.mean, cfg.crops.std,
                           device, FeatureCache(None, ""))
        r = attention_jaccard(f.attn, (f.mask != 0) & (f.mask != IGNORE), f.mask != IGNORE)
        out[name] = {**{k: r[k] for k in ("jaccard_best", "jaccard_mean", "best_head", "object_area")},
                     "object_mass": max(r["object_mass"])}
    return out


class Frozen:
    """Cached frozen features (every kind `features.select` offers) of a labelled source's train and test splits."""

    def __init__(self, train: Features, train_labels: torch.Tensor, test: Features, test_labels: torch.Tensor,
                 classes: list[str]):
        self.train, self.train_labels, self.test, self.test_labels = train, train_labels, test, test_labels
        self.classes = classes


def frozen_features(loaded, spec: str, device: torch.device, cache: FeatureCache) -> Frozen:
    """The features of `loaded` (a `weights.Loaded`) on both splits of `spec`, through the cache."""
    splits = dict(zip(("train", "test"), labelled_splits(spec)))
    backbone = loaded.backbone.to(device)
    settings = {"size": loaded.image_size, "mean": list(loaded.mean), "std": list(loaded.std)}
    out = {}
    for split, source in splits.items():
        compute = lambda s=source, split=split: backbone_features(  # noqa: E731
            backbone, s, loaded.image_size, device, mean=loaded.mean, std=loaded.std, tokens=True,
            desc=f"frozen features {spec}:{split}")
        out[split] = cache.get(spec, split, source, compute, **settings)
    return Frozen(*out["train"], *out["test"], list(splits["train"].classes))
