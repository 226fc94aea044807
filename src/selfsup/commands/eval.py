"""`selfsup eval PROTOCOL`: frozen-feature evaluation of any backbone `selfsup.load` accepts."""
from __future__ import annotations

import argparse

import torch

from ..errors import UserError


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run folder, a checkpoint, a safetensors export")
    p.add_argument("--data", default="mnist5k", help="labelled data: mnist5k | digits | a folder with class subfolders")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--random-init", action="store_true", help="evaluate the same architecture untrained (a baseline)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate frozen features (k-NN, ...)")
    protocols = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    knn = protocols.add_parser("knn", help="weighted k-NN (DINO: k=20, T=0.07) on [CLS] features",
                               description="Weighted k-NN on L2-normalised [CLS] features: the k nearest training "
                               "images vote for their class with weight exp(cos / T).")
    common(knn)
    knn.add_argument("--k", default="20", help="neighbours; several at once as 10,20,100,200")
    knn.add_argument("--temperature", type=float, default=0.07, help="T in exp(cos / T)")
    knn.set_defaults(run=run_knn)


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        raise UserError(f"--k {text}: expected whole numbers separated by commas (e.g. 10,20,100)") from None
    if any(k < 1 for k in ks):
        raise UserError(f"--k {text}: every k must be at least 1")
    return ks


def loaded_backbone(args: argparse.Namespace):
    """The backbone to evaluate, with its input size; `--random-init` builds the same architecture afresh."""
    from ..train.trainer import resolve_device
    from ..weights import load

    loaded = load(args.checkpoint)
    if args.random_init:
        loaded.backbone = loaded.random_init(seed=0)
    return loaded, resolve_device(args.device)


def run_knn(args: argparse.Namespace) -> int:
    from ..cli import print_json
    from ..eval.features import backbone_features
    from ..eval.run import knn_of, labelled_splits

    ks = parse_ks(args.k)
    loaded, device = loaded_backbone(args)
    train, test = labelled_splits(args.data)
    backbone = loaded.backbone.to(device)
    table = knn_of(lambda s: backbone_features(backbone, s, loaded.image_size, device), train, test, ks,
                   args.temperature)
    what = "random init" if args.random_init else loaded.source
    print(f"weighted k-NN (T={args.temperature}) of {what} on {args.data}: {len(train)} train, {len(test)} test")
    for k, r in table.items():
        print(f"  k={k:<4} top-1 {r['top1']:6.2f} %   top-5 {r['top5']:6.2f} %")
    if args.json:
        result = dict(table[ks[0]]) if len(ks) == 1 else {}
        result.update({"k": {str(k): v for k, v in table.items()}, "checkpoint": str(args.checkpoint),
                       "data": args.data, "random_init": args.random_init})
        print_json(result)
    return 0
