"""`selfsup eval PROTOCOL`: frozen-feature evaluation of any backbone `selfsup.load` accepts.

Every protocol reads the same cached features (eval/cache.py), prints a table, records its result in the run
folder (`eval/<protocol>-<data>.json`, for `selfsup report`) and, with --json, ends with one JSON line."""
from __future__ import annotations

import argparse

import torch

from ..core.errors import UserError
from ..eval.cache import FeatureCache, cache_folder
from ..eval.cluster import kmeans_scores
from ..eval.features import available, select
from ..eval.knn import knn_accuracy
from ..eval.linear import LEARNING_RATES, linear_probe
from ..eval.lowshot import lowshot
from ..eval.retrieval import retrieval_scores
from ..eval.run import frozen_features
from .eval_dense import register as register_dense
from .shared import finish, loaded_backbone


def common(p: argparse.ArgumentParser, features: str = "cls") -> None:
    p.add_argument("--checkpoint", required=True, help="a run folder, a checkpoint, a safetensors export")
    p.add_argument("--data", default="mnist5k", help="labelled data: mnist5k | digits | scenes | a folder with class subfolders")
    p.add_argument("--features", default=features,
                   help="cls | cls+avgpool (the average-pooled patch tokens appended) | last4 (the [CLS] of the last "
                        f"4 blocks, concatenated; any lastN) | last4+avgpool (default: {features})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--random-init", action="store_true", help="evaluate the same architecture untrained (a baseline)")
    p.add_argument("--no-cache", action="store_true", help="compute the features afresh and do not store them")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate frozen features: knn | linear | lowshot | cluster | retrieval | "
                       "attention-masks | segment | depth | video | copydetect",
                       description="Evaluate a backbone's frozen features on labelled data. Features are computed "
                       "once and cached in the run folder (or beside the checkpoint), keyed by checkpoint and data.")
    protocols = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)

    knn = protocols.add_parser("knn", help="weighted k-NN (DINO: k=20, T=0.07) on [CLS] features",
                               description="Weighted k-NN on L2-normalised features: the k nearest training images "
                               "vote for their class with weight exp(cos / T) (DINO Sec. 4.1).")
    common(knn)
    knn.add_argument("--k", default="20", help="neighbours; several at once (one search) as 10,20,100,200")
    knn.add_argument("--temperature", type=float, default=0.07, help="T in exp(cos / T)")
    knn.set_defaults(run=run_knn)

    linear = protocols.add_parser(
        "linear", help="linear probe, learning rate (and feature kind) chosen on a validation split",
        description="Linear classifiers on frozen, standardised features, DINOv2-style: one per (feature kind, "
        "learning rate), all trained together in one pass (SGD, momentum 0.9, cosine to 0, lr x batch/256); the best "
        "on a validation split carved from train gives the test top-1/top-5. --features all sweeps every kind.")
    common(linear, features="all")
    linear.add_argument("--epochs", type=int, default=30, help="passes over the cached training features")
    linear.add_argument("--batch-size", type=int, default=256, help="minibatch of features")
    linear.add_argument("--lrs", help="comma-separated learning rates per 256 images (default: DINOv2's 13 from 1e-5 "
                        "to 0.1, then 0.2, 0.5, 1)")
    linear.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out to choose the lr")
    linear.set_defaults(run=run_linear)

    lowshot = protocols.add_parser(
        "lowshot", help="logistic regression on 1 %% and 10 %% of the labels, 3 seeds",
        description="Low-shot (DINO Table 12, iBOT Table 4): scikit-learn logistic regression on L2-normalised "
        "features of 1 % and 10 % of each class of train, 3 seeds; test top-1 mean +/- std.")
    common(lowshot)
    lowshot.add_argument("--fractions", default="0.01,0.1", help="shares of the training labels")
    lowshot.add_argument("--seeds", type=int, default=3, help="number of random label subsets per share")
    lowshot.add_argument("--lambd", type=float, default=1e-4,
                         help="L2 penalty on the mean loss (iBOT's lambda; its 0.1 over-regularises small data)")
    lowshot.set_defaults(run=run_lowshot)

    cluster = protocols.add_parser(
        "cluster", help="k-means (k = classes) on the test split: ACC, NMI, ARI, FMI",
        description="k-means with k = the number of classes on L2-normalised test features (iBOT Table 5): ACC "
        "(Hungarian matching of clusters to classes), NMI, ARI and FMI.")
    common(cluster)
    cluster.add_argument("--seed", type=int, default=0, help="k-means seed (10 restarts)")
    cluster.set_defaults(run=run_cluster)

    retrieval = protocols.add_parser(
        "retrieval", help="test images query the train set by cosine: mAP, recall@1/5",
        description="Each test image ranks the train images by cosine similarity; same class = relevant. "
        "Reports mAP over the full ranking and recall@1/5 (a relevant image among the k nearest).")
    common(retrieval)
    retrieval.set_defaults(run=run_retrieval)
    register_dense(protocols)


def parse_list(text: str, flag: str, kind=int, low: float = 1) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text}: expected {'whole ' if kind is int else ''}numbers separated by commas") from None
    if any(v < low for v in values):
        raise UserError(f"{flag} {text}: every value must be at least {low}")
    return values


def parse_ks(text: str) -> list[int]:
    return parse_list(text, "--k")


def frozen(args: argparse.Namespace):
    """The cached features of the train and test splits, and a one-line description of what is evaluated."""
    loaded, device = loaded_backbone(args)
    folder = None if args.no_cache else cache_folder(args.checkpoint)
    cache = FeatureCache(folder, args.checkpoint, "random-init" if args.random_init else "trained")
    f = frozen_features(loaded, args.data, device, cache)
    what = "random init" if args.random_init else loaded.source
    return f, f"{what} on {args.data} ({len(f.train_labels)} train, {len(f.test_labels)} test)", device


def features(f, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    return select(f.train, kind), select(f.test, kind)


def run_knn(args: argparse.Namespace) -> int:
    ks = parse_ks(args.k)
    f, what, _ = frozen(args)
    xtr, xte = features(f, args.features)
    table = knn_accuracy(xtr, f.train_labels, xte, f.test_labels, ks, args.temperature)
    print(f"weighted k-NN (T={args.temperature}, {args.features}) of {what}:")
    for k, r in table.items():
        print(f"  k={k:<4} top-1 {r['top1']:6.2f} %   top-5 {r['top5']:6.2f} %")
    result = dict(table[ks[0]]) if len(ks) == 1 else {}
    result["k"] = {str(k): v for k, v in table.items()}
    return finish(args, "knn", result)


def run_linear(args: argparse.Namespace) -> int:
    f, what, device = frozen(args)
    kinds = available(f.train) if args.features == "all" else args.features.split(",")
    lrs = parse_list(args.lrs, "--lrs", float, 0.0) if args.lrs else list(LEARNING_RATES)
    train = {k: features(f, k)[0] for k in kinds}
    test = {k: features(f, k)[1] for k in kinds}
    r = linear_probe(train, f.train_labels, test, f.test_labels, len(f.classes), lrs, args.epochs, args.batch_size,
                     args.val_fraction, device=device)
    print(f"linear probe ({len(lrs)} learning rates x {len(kinds)} feature kinds, {args.epochs} epochs) of {what}:")
    print(f"  {'features':<16}{'lr':>9}{'val top-1':>11}{'test top-1':>12}{'top-5':>9}")
    for kind, k in r["kinds"].items():
        mark = "  <- chosen on val" if kind == r["best"] else ""
        print(f"  {kind:<16}{k['lr']:>9.0e}{k['val_top1']:>10.2f}%{k['top1']:>11.2f}%{k['top5']:>8.2f}%{mark}")
    return finish(args, "linear", {"epochs": args.epochs, "lrs": lrs, **r})


def run_lowshot(args: argparse.Namespace) -> int:
    fractions = parse_list(args.fractions, "--fractions", float, 0.0)
    if any(fr > 1 for fr in fractions) or args.seeds < 1 or args.lambd <= 0:
        raise UserError("lowshot: --fractions must lie in (0, 1], --seeds >= 1 and --lambd > 0")
    f, what, _ = frozen(args)
    xtr, xte = features(f, args.features)
    r = lowshot(xtr, f.train_labels, xte, f.test_labels, fractions, tuple(range(args.seeds)), args.lambd)
    print(f"low-shot logistic regression (lambda={args.lambd}, {args.seeds} seeds, {args.features}) of {what}:")
    for name, v in r.items():
        print(f"  {name:>4} of the labels ({v['n_labels']:>5} images)  top-1 {v['mean']:6.2f} +/- {v['std']:.2f} %")
    return finish(args, "lowshot", {"lambd": args.lambd, "fractions": r})


def run_cluster(args: argparse.Namespace) -> int:
    f, what, _ = frozen(args)
    _, xte = features(f, args.features)
    r = kmeans_scores(xte, f.test_labels, len(f.classes), args.seed)
    print(f"k-means (k={len(f.classes)}) on the test features ({args.features}) of {what}:")
    print("  " + "   ".join(f"{name.upper()} {v:6.2f} %" for name, v in r.items()))
    return finish(args, "cluster", r)


def run_retrieval(args: argparse.Namespace) -> int:
    f, what, _ = frozen(args)
    xtr, xte = features(f, args.features)
    r = retrieval_scores(xtr, f.train_labels, xte, f.test_labels)
    print(f"retrieval (test queries the train set by cosine, {args.features}) of {what}:")
    print("  " + "   ".join(f"{name} {v:6.2f} %" for name, v in r.items()))
    return finish(args, "retrieval", r)
