"""A recipe fitted to the user's data and machine, for `selfsup train --data FOLDER` without `--config`.

Two readings decide it: the typical image size (median short side of a few hundred files) and where the run
happens (device, cores). On a GPU the method's paper recipe (`<method>_imagenet`) is kept and only the crops
shrink to what the images hold; on a CPU the method's CPU recipe (`<method>_mnist5k`, whose head, teacher and lr
were measured for short runs) gets crops, patch and depth for 4 to 16 tokens a crop. The batch is then fitted to
the free memory by the trainer's trial steps (`training/plan.py`), and on a CPU the run's length to a time budget.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..config import Config, load_recipe
from ..data.sources import Source, image_size

PAPER_GLOBAL, PAPER_LOCAL = 224, 96  # DINO's multi-crop sizes
CPU_GLOBAL_MAX = 64  # a CPU trains a few dozen tokens per crop in minutes, not 196
SMALL_IMAGES = 32  # px: below this a CPU keeps the backbone its <method>_mnist5k recipe has for 28-px digits
CPU_TIME = "10m"  # a CPU run's length when none is given: the paper's 100 epochs would take hours
N_SAMPLED = 300
MULTI_CROP = ("dino", "ibot", "dinov2", "distill")  # the methods with local crops


@dataclass
class DataProfile:
    n_images: int
    short_side: int  # median over the sampled images
    sampled: int


def profile(source: Source) -> DataProfile:
    """The typical image size of `source`, from the headers of up to N_SAMPLED files evenly spread over it
    (decoded items for sources that are not files)."""
    n = len(source)
    k = min(n, N_SAMPLED)
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    files = getattr(source, "files", None)
    sides = []
    for i in picks:
        if files is not None:
            try:
                sides.append(min(image_size(files[i])))
            except Exception:  # noqa: BLE001 - an unreadable file is counted by the source itself
                continue
        else:
            sides.append(min(source[i][0].shape[-2:]))
    return DataProfile(n, int(statistics.median(sides)) if sides else PAPER_GLOBAL, len(sides))


def snap(size: float, patch: int) -> int:
    """The largest multiple of `patch` not above `size` (at least one patch)."""
    return max(patch, int(size) // patch * patch)


PATCHES = (2, 4, 7, 8, 14, 16)  # the patch sizes of the papers' models and of selfsup's recipes


def nice_patch(global_size: int, grid: int) -> int:
    """The largest of PATCHES that gives at least a `grid` x `grid` token grid on the global crop."""
    return max((p for p in PATCHES if p * grid <= global_size), default=PATCHES[0])


def fitted(method: str, data: DataProfile, device: torch.device, cores: int, user: dict,
           device_name: str = "") -> tuple[str, dict, list[str]]:
    """(base recipe, overrides on top of it, lines saying why). `user` holds what the command line set
    (nested dict); what it sets is respected, and crops are fitted to its patch size."""
    backbone_user = user.get("backbone", {})
    cpu = device.type != "cuda"
    recipe = f"{method}_{'mnist5k' if cpu else 'imagenet'}"
    side = data.short_side
    why = [f"data: {data.n_images:,} images, median short side {side} px (of {data.sampled} sampled)"]
    over: dict = {"data": {}, "crops": {}, "backbone": {}, "train": {}}
    if cpu:
        g = min(side, CPU_GLOBAL_MAX)
        patch, depth = nice_patch(g, 4), 4  # 16 tokens: 16 px at 64
        if g < SMALL_IMAGES:
            # images as small as MNIST's keep the patch and depth their CPU recipe was measured with (where they
            # give 2 x 2 tokens at least): dino_mnist5k's 2 x 2 tokens and 2 blocks learn far faster than 4 x 4 and
            # 4 blocks (k-NN 74 % against 55 % after 8 minutes on a Fashion-MNIST pool, issue 15's note)
            base = Config()
            load_recipe(base, recipe)
            if 2 * base.backbone.patch_size <= g:
                patch, depth = base.backbone.patch_size, base.backbone.depth
        patch = backbone_user.get("patch_size") or patch
        g = snap(g, patch)
        local = snap(g / 2, patch)
        over["backbone"].update(arch="vit_tiny", patch_size=patch, img_size=g)
        if "arch" not in backbone_user:
            over["backbone"]["depth"] = depth
        over["crops"].update(global_size=g, local_size=local)
        if method in MULTI_CROP:
            over["crops"]["n_local"] = 4
        workers = max(1, cores // 2)
        over["train"].update(device="cpu", threads=max(1, cores - workers))
        depth = backbone_user.get("depth", over["backbone"].get("depth"))  # what the user set wins, as in the run
        arch = backbone_user.get("arch", "vit_tiny") + (f", {depth} blocks" if depth else "")
        why.append(f"machine: CPU, {cores} usable core(s): {arch}, patch {patch} ({g // patch} x "
                   f"{g // patch} tokens), crops {g} / {local} px; head, teacher and lr of {recipe}")
    else:
        g = min(side, PAPER_GLOBAL)
        patch = backbone_user.get("patch_size") or (16 if g >= 112 else nice_patch(g, 8))
        g = snap(g, patch)
        local = snap(g * PAPER_LOCAL / PAPER_GLOBAL, patch)
        over["backbone"].update(patch_size=patch, img_size=g)
        over["crops"].update(global_size=g, local_size=local)
        workers = max(1, min(10, cores - 1))  # 10: the papers' loader workers per GPU
        over["train"]["device"] = str(device)
        why.append(f"machine: {device_name or device}, {cores} usable cores: the {recipe} recipe, "
                   f"crops {g} / {local} px, patch {patch}")
    over["data"]["num_workers"] = workers
    # natural images: the paper's flips and solarization (the CPU recipes drop them for digits only); blur in
    # pixels of the crop, scaled from the paper's sigma 0.1-2.0 at 224 px
    over["crops"].update(flip=0.5, solarize=[0.0, 0.2, 0.0] if method in (*MULTI_CROP, "byol") else [0.0, 0.0, 0.0],
                         blur_sigma=[0.1, max(0.5, round(2.0 * g / PAPER_GLOBAL, 2))])
    if g < PAPER_GLOBAL and cpu:
        why.append(f"crop size {g} px: the images' short side is {side} px" if side <= CPU_GLOBAL_MAX
                   else f"crop size {g} px: at most {CPU_GLOBAL_MAX} on a CPU (set crops.global_size to change)")
    why.append(f"loader: {workers} worker(s)" + (f" beside {cores - workers} compute thread(s)" if cpu and cores > workers else ""))
    return recipe, {k: v for k, v in over.items() if v}, why
