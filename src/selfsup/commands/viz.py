"""`selfsup viz attention|pca IMAGE...`: what a backbone sees, as PNG figures."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..api.evaluate import Target
from ..cli import print_json
from ..core.errors import UserError
from ..eval.cache import run_folder
from ..viz.attention import attention_figure, attention_maps
from ..viz.images import viz_images
from ..viz.pca import pca_figure, pca_maps


def register(sub) -> None:
    p = sub.add_parser("viz", help="pictures of what a backbone sees: attention maps, PCA of patch features")
    kinds = p.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    attention = kinds.add_parser(
        "attention", help="per-head [CLS] attention of the last block, with 60 %% attention-mass masks",
        description="The [CLS] query's attention over the patches in each head of the last block, upsampled onto "
        "the image (DINO Fig. 1, 3), and the smallest set of patches holding 60 % of each head's attention (DINO "
        "Fig. 4). Register tokens are left out of the maps and shown apart.")
    common(attention)
    attention.add_argument("--mass", type=float, default=0.6, help="share of the attention the masks keep")
    attention.set_defaults(run=run_attention)
    pca = kinds.add_parser(
        "pca", help="PCA of patch features across the images, first 3 components as RGB",
        description="PCA of the patch features of all given images together (DINOv2 Fig. 1): the first component, "
        "thresholded (Otsu), removes the background; 3 components of a PCA of the foreground patches become RGB.")
    common(pca)
    pca.set_defaults(run=run_pca)


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, help="a run folder, a checkpoint, a safetensors export")
    p.add_argument("--data", help="take images from a source too: skimage (sample photos) | mnist5k | digits | a folder")
    p.add_argument("--n", type=int, default=4, help="how many images to take from --data")
    p.add_argument("--size", type=int, help="shorter side fed to the model in pixels (default: its training size)")
    p.add_argument("--out", help="folder for the PNG (default: <run>/viz, or ./selfsup-viz)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--random-init", action="store_true", help="the same architecture untrained (to compare)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")


def setup(args: argparse.Namespace):
    """(loaded backbone, images, input size, output folder, device)."""
    if args.n < 1 or (args.size is not None and args.size < 1):
        raise UserError("--n and --size must be at least 1")
    loaded, device = Target(args.checkpoint, args.data, args.device, args.random_init).loaded(rgb=f"viz {args.figure}")
    images = viz_images(args.images, args.data, args.n)
    run = run_folder(args.checkpoint)
    out = Path(args.out) if args.out else (run / "viz" if run else Path("selfsup-viz"))
    return loaded, images, args.size or loaded.image_size, out, device


def finish(args: argparse.Namespace, result: dict) -> int:
    print(f"wrote {result['png']}")
    if args.json:
        print_json({"checkpoint": str(args.checkpoint), "random_init": args.random_init, **result})
    return 0


def run_attention(args: argparse.Namespace) -> int:
    if not 0 < args.mass <= 1:
        raise UserError(f"--mass {args.mass}: expected a share in (0, 1]")
    loaded, images, size, out, device = setup(args)
    maps = attention_maps(loaded.backbone, images, size, loaded.mean, loaded.std, device)
    name = "attention-random-init.png" if args.random_init else "attention.png"
    result = attention_figure(maps, out / name, args.mass)
    for img in result["images"]:
        print(f"  {img['image']}: {img['grid'][0]}x{img['grid'][1]} patches, {args.mass:.0%} of the attention in "
              + ", ".join(str(k) for k in img["mask_patches"]) + " patches (per head)")
    return finish(args, result)


def run_pca(args: argparse.Namespace) -> int:
    loaded, images, size, out, device = setup(args)
    maps = pca_maps(loaded.backbone, images, size, loaded.mean, loaded.std, device)
    result = pca_figure(maps, out / ("pca-random-init.png" if args.random_init else "pca.png"))
    for img in result["images"]:
        print(f"  {img['image']}: {img['foreground_patches']} of {img['grid'][0] * img['grid'][1]} patches foreground")
    return finish(args, result)
