"""`selfsup train`: the command line of `selfsup.train` (api/run.py)."""
from __future__ import annotations

import argparse

from ..api.run import train
from ..cli import print_json


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a backbone with a self-supervised method",
        description="Pretrain a backbone. With no arguments: DINO on a small ViT-tiny on the built-in MNIST 5k, on "
        "the CPU, then the teacher's k-NN accuracy beside random init and raw pixels.",
        epilog="Any config key can be set as key.sub=value, e.g. optim.lr=1e-3 crops.n_local=4 dino.out_dim=4096. "
        "Without --config, the recipe is <method>_mnist5k for built-in data (<method>_scenes on scenes, where one "
        "exists); for a folder or shards it is fitted to "
        "the images (their median short side) and the machine: on a GPU the paper's <method>_imagenet with crops no "
        "larger than the images, on a CPU a small ViT for 10 minutes. Trial steps then fit the batch to the free "
        "memory and print an ETA; train.time (--time) sets the length from the measured speed; the collapse "
        "watchdog warns (train.stop_on_collapse=true: stops). "
        "Under torchrun (torchrun --nproc-per-node N -m selfsup train ...) every process trains its share of the "
        "global batch with DDP, or FSDP2 with train.distributed=fsdp. SIGTERM/SIGINT save a checkpoint and exit; "
        "--resume continues.",
    )
    p.add_argument("--config", help="a recipe: YAML file, or the name of a shipped one (e.g. dinov2_vits8)")
    p.add_argument("--method", help="simclr | moco | byol | dino | ibot | dinov2 | distill (default: dino)")
    p.add_argument("--arch", help="backbone: vit_tiny | vit_small | vit_base | vit_large | vit_giant2 | resnet18 | resnet50")
    p.add_argument("--patch-size", type=int, help="ViT patch size")
    p.add_argument("--data", help="mnist5k | digits | scenes | a folder of images | webdataset shards | an image "
                   "list (.txt, e.g. curate's selected.txt) (default: mnist5k)")
    p.add_argument("--out", help="run folder (default: runs/<method>-<arch>-<data>, a new one for each run)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="length of the run in epochs")
    length.add_argument("--steps", type=int, help="length of the run in optimiser steps")
    length.add_argument("--time", metavar="DURATION",
                        help="length of the whole command, final evaluation included (90s, 10m, 2h): the steps are "
                        "set from the speed of trial steps")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or the latest default run folder)")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from pretrained weights: a selfsup run folder or checkpoint (heads included when the "
                   "method and shapes match), a backbone export, or official DINO/DINOv2 weights; the backbone "
                   "architecture is taken from it. A backbone without its heads is first frozen while the new "
                   "heads learn (init.head_warmup_steps, default 10 %% of the run), then trains with layer-wise lr "
                   "decay (init.layerwise_decay 0.9) after a warm-up (init.warmup_steps, 5 %%)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    done = train(args.data, args.method, args.out, config=args.config, arch=args.arch, patch_size=args.patch_size,
                 epochs=args.epochs, steps=args.steps, time=args.time, batch_size=args.batch_size, device=args.device,
                 resume=args.resume, init_from=args.init_from, overrides=args.overrides)
    if done.summary:
        print(done.summary)
    if args.json and done.results is not None:
        print_json(done.results)
    return done.exit_code
