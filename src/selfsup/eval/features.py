"""Frozen features of a labelled source: computed once per (backbone, data) and reused by every protocol."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..core.errors import UserError
from ..core.io import atomic_write
from ..core.machine import usable_cores
from ..core.progress import ProgressLine
from ..data.channels import fit_channels
from ..data.sources import EncodedSource, Skipped, Source, TensorSource
from ..data.views import eval_resize_crop, eval_transform
from ..nn.vit import VisionTransformer

log = logging.getLogger("selfsup")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
N_LAST = 4  # DINO linear eval of ViT-S: the [CLS] of the last 4 blocks (eval_linear.py, n_last_blocks)
KINDS = ("cls", "cls+avgpool", "last4", "last4+avgpool")  # DINOv2 linear.py: n in {1, 4} x avgpool in {no, yes}
MAX_WORKERS = 8  # loader processes decoding for feature extraction

Features = dict[str, torch.Tensor]


def loader_workers(source: Source, batch: int) -> int:
    """Processes that decode for `eval_images`: one per usable core but the main process's, at most 8; none
    for images in memory (already batched fast) or fewer than two batches."""
    if isinstance(source, TensorSource) or len(source) < 2 * batch:
        return 0
    return min(MAX_WORKERS, usable_cores() - 1)


class EvalBatches(Dataset):
    """Batch b of an encoded source in its evaluation view, decoded and transformed where it is read (a loader
    worker): (images, labels, news). `news` is what a worker's copy of the source newly counted as unusable (a
    `Skipped`) or the UserError it raised, for the main process to count or raise; None in the main process."""

    def __init__(self, source: Source, size: int, mean, std, batch: int, start: int = 0):
        self.source, self.size, self.mean, self.std, self.batch, self.start = source, size, mean, std, batch, start

    def __len__(self) -> int:
        return -(-(len(self.source) - self.start) // self.batch)

    def read(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.start + b * self.batch
        items = [self.source[j] for j in range(first, min(first + self.batch, len(self.source)))]
        x = torch.stack([eval_transform(img, self.size, self.mean, self.std) for img, _ in items])
        return x, torch.tensor([label for _, label in items])

    def __getitem__(self, b: int) -> tuple[torch.Tensor | None, torch.Tensor | None, Skipped | UserError | None]:
        if get_worker_info() is None or not isinstance(self.source, EncodedSource):
            return *self.read(b), None
        skipped = self.source.skipped
        count, named = skipped.count, len(skipped.first)
        try:
            x, y = self.read(b)
        except UserError as e:  # raised again by the main process: DataLoader would wrap it in a traceback
            return None, None, e
        return x, y, Skipped(skipped.count - count, skipped.first[named:])


def eval_images(source: Source, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch: int = 256,
                workers: int | None = None, start: int = 0):
    """Yields (normalised images [b, C, size, size], labels [b]) over the source from image `start`, in order;
    C is the number of channels of `mean` and `std`. Files are decoded by `workers` loader processes (default:
    `loader_workers`). Tar shards, streamed for training, are read here by index like a folder (each worker opens
    its own file handles)."""
    source.channels = len(mean)
    if isinstance(source, TensorSource):  # same-size images: transform a whole batch at once
        m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        labels = source.labels()
        for i in range(start, len(source), batch):
            x = fit_channels(source.images[i : i + batch].float() / 255.0, len(mean), source.name)
            yield (eval_resize_crop(x, size) - m) / s, labels[i : i + batch]
        return
    workers = loader_workers(source, batch) if workers is None else workers
    batches = DataLoader(EvalBatches(source, size, mean, std, batch, start), batch_size=None, num_workers=workers,
                         persistent_workers=False)  # sequential: batch b is rows b * batch onwards
    for x, y, news in batches:
        if isinstance(news, UserError):
            raise news
        if news is not None and news.count:  # decode failures in a worker: counted as if read here
            source.skipped.count += news.count
            source.skipped.first += news.first[: 3 - len(source.skipped.first)]
            source.replaced += news.count
        yield x, y


@torch.no_grad()
def extract(forward: Callable[[torch.Tensor], torch.Tensor | Features], source: Source, size: int,
            device: torch.device | str = "cpu", batch: int = 256, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            desc: str = "features", workers: int | None = None, resume: Path | None = None,
            save_every: int = 20_000):
    """Features (float32, on the CPU) and labels [N] of every image of `source`: a tensor [N, D] when `forward`
    returns one, a dict of them when it returns a dict. `desc` names the job in the progress lines. With
    `resume` (a file), the rows done so far are saved there about every `save_every` images, and an
    extraction that was stopped starts again after them; the file is removed once all rows are done."""
    parts, labels = [], []
    if resume is not None and resume.exists():
        done = load_file(str(resume))
        labels.append(done.pop("labels"))
        parts.append(done["features"] if set(done) == {"features"} else done)
        log.info("%s: resuming after %d of %d images (%s)", desc, len(labels[0]), len(source), resume)
    start = sum(len(y) for y in labels)
    saved = start
    with ProgressLine(len(source) - start, desc) as progress:
        for x, y in eval_images(source, size, mean, std, batch, workers, start):
            out = forward(x.to(device))
            parts.append({k: v.float().cpu() for k, v in out.items()} if isinstance(out, dict) else out.float().cpu())
            labels.append(y)
            progress.update(len(x))
            start += len(x)
            if resume is not None and start - saved >= save_every and start < len(source):
                save_rows(resume, joined(parts), torch.cat(labels))
                saved = start
    if resume is not None:
        resume.unlink(missing_ok=True)
    return joined(parts), torch.cat(labels)


def joined(parts: list) -> torch.Tensor | Features:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def save_rows(path: Path, feats: torch.Tensor | Features, labels: torch.Tensor) -> None:
    """The rows extracted so far, replacing the file at once (a crash leaves the previous rows)."""
    tensors = dict(feats) if isinstance(feats, dict) else {"features": feats}
    tensors = {**{k: v.contiguous() for k, v in tensors.items()}, "labels": labels}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def backbone_features(backbone: nn.Module, source: Source, size: int, device="cpu", batch: int = 256,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, tokens: bool = False, desc: str = "features"):
    """Features of a backbone in eval mode: its [CLS] [N, D], or with `tokens` every kind `select` offers."""
    was_training = backbone.training
    backbone.eval()
    try:
        forward = (lambda x: token_features(backbone, x)) if tokens else backbone
        return extract(forward, source, size, device, batch, mean, std, desc)
    finally:
        backbone.train(was_training)


def token_features(backbone: nn.Module, x: torch.Tensor, n_last: int = N_LAST) -> Features:
    """'cls': the [CLS] of the last n blocks [b, n, D]; 'avgpool': the mean of the last block's patch tokens
    [b, D] (registers excluded); all through the final norm, as DINO's get_intermediate_layers gives them."""
    if not isinstance(backbone, VisionTransformer):  # a CNN: its pooled feature is the only kind
        return {"cls": backbone(x).unsqueeze(1)}
    outs = backbone.intermediate_outputs(x, n=min(n_last, len(backbone.blocks)))
    return {"cls": torch.stack([o["x_norm_clstoken"] for o in outs], 1),
            "avgpool": outs[-1]["x_norm_patchtokens"].mean(1)}


def select(feats: Features, kind: str) -> torch.Tensor:
    """One kind of feature [N, D']: 'cls', 'last<n>' (the [CLS] of the last n blocks, concatenated), either
    with '+avgpool' (the average-pooled patch tokens appended; DINO eval_linear.py, DINOv2 create_linear_input)."""
    m = re.fullmatch(r"(cls|last(\d+))(\+avgpool)?", kind)
    if m is None:
        raise UserError(f"--features {kind}: expected cls, lastN or either with +avgpool (e.g. {', '.join(KINDS)})")
    n = int(m.group(2)) if m.group(2) else 1
    stored = feats["cls"].shape[1]
    if n < 1 or n > stored:
        raise UserError(f"--features {kind}: the features hold the [CLS] of the last {stored} block(s) at most "
                        f"(n from 1 to {stored})")
    parts = [feats["cls"][:, -n:].flatten(1)]
    if m.group(3):
        if "avgpool" not in feats:
            raise UserError(f"--features {kind}: this backbone has no patch tokens to pool (use cls)")
        parts.append(feats["avgpool"])
    return torch.cat(parts, 1)


def available(feats: Features) -> list[str]:
    """The kinds of KINDS this backbone's features offer (a 2-block ViT has no 'last4', a CNN no 'avgpool')."""
    n, pooled = feats["cls"].shape[1], "avgpool" in feats
    return [k for k in KINDS if (not k.startswith("last") or n >= N_LAST) and (pooled or "avgpool" not in k)]


def pixel_features(source: Source, size: int, desc: str = "raw pixels", mean=IMAGENET_MEAN,
                   std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels as features (the k-NN baseline): the normalised image, flattened."""
    return extract(lambda x: x.flatten(1), source, size, mean=mean, std=std, desc=desc)
