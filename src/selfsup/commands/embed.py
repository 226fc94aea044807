"""`selfsup embed`: the command line of `selfsup.embed` (api/embed.py): the features of every image of a data set,
written to one safetensors file for other tools."""
from __future__ import annotations

import argparse

from ..api.embed import embed


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


def run(args: argparse.Namespace) -> int:
    r = embed(args.checkpoint, args.data, args.out, patch_mean=args.patch_mean, device=args.device,
              batch_size=args.batch_size, workers=args.workers)
    n, d = r["tensors"]["features"]
    what = ", ".join(f"{k} {v}" for k, v in r["tensors"].items())
    print(f"{n} images of {args.data} -> {r['path']} ({what}; {d}-dim features of {r['source']})")
    return 0
