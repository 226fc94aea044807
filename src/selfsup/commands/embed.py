"""`selfsup embed`: features of every image of a data set, written to one safetensors file for other tools."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.device import resolve_device
from ..core.errors import UserError
from ..core.io import atomic_write
from ..data.builtin import open_source
from ..eval.features import extract
from ..weights import load

log = logging.getLogger("selfsup")


def register(sub) -> None:
    p = sub.add_parser(
        "embed", help="write the features of every image to a safetensors file",
        description="Features of every image of --data from any backbone `selfsup.load` accepts: the [CLS] "
        "feature (tensor 'features' [N, D]; a ResNet's pooled feature), optionally the mean of the patch tokens "
        "('patch_mean' [N, D]; registers excluded), the labels where known ('labels' [N]). The metadata entry "
        "'selfsup' is JSON: the checkpoint, the data, the input size and normalisation, the file names (for a "
        "folder) and the class names (where known). Images are resized and centre-cropped as for evaluation.")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, a checkpoint, a safetensors export, or an official DINO/DINOv2 .pth")
    p.add_argument("--data", required=True, help="mnist5k | digits | skimage | a folder of images | shards | an image list (.txt)")
    p.add_argument("--out", required=True, help="the output file (.safetensors)")
    p.add_argument("--patch-mean", action="store_true", help="also store the mean of the patch tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, help="loader processes decoding the images (default: one per usable core "
                   "but one, at most 8; none for built-in sets and data under two batches)")
    p.set_defaults(run=run)


def file_names(source) -> list[str] | None:
    """Paths relative to the folder, in feature order, for sources of files."""
    files = getattr(source, "files", None)
    return [str(Path(f).relative_to(source.root)) for f in files] if files is not None else None


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected at least 1")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 (decode in this process) or more")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: expected a file name ending in .safetensors")
    loaded = load(args.checkpoint)
    device = resolve_device(args.device)
    source = open_source(args.data)
    backbone = loaded.backbone.to(device).eval()

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        o = backbone.forward_features(x)
        feats = {"features": o["x_norm_clstoken"]}
        if args.patch_mean:
            feats["patch_mean"] = o["x_norm_patchtokens"].mean(1)
        return feats

    tensors, labels = extract(forward, source, loaded.image_size, device, args.batch_size, loaded.mean, loaded.std,
                              desc=f"embed {args.data}", workers=args.workers)
    if getattr(source, "replaced", 0):  # files left out up front (source.skipped) have no row to repeat
        log.warning(f"{args.data}: {source.replaced} unreadable file(s) replaced by the next image; "
                    "their rows repeat it")
    if source.labelled:
        tensors["labels"] = labels
    meta = {"checkpoint": str(args.checkpoint), "data": args.data, "image_size": loaded.image_size,
            "mean": list(loaded.mean), "std": list(loaded.std), "files": file_names(source),
            "classes": source.classes}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata={"selfsup": json.dumps(meta)}))
    n, d = tensors["features"].shape
    what = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    print(f"{n} images of {args.data} -> {out} ({what}; {d}-dim features of {loaded.source})")
    return 0
