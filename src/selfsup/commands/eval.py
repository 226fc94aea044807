"""`selfsup eval PROTOCOL`: the command line of `selfsup.evaluate` (api/evaluate.py), which evaluates the frozen
features of any backbone `selfsup.load` accepts and records the result in the run folder; this prints its table
and, with --json, ends with one JSON line."""
from __future__ import annotations

import argparse
import inspect

from ..api.evaluate import PROTOCOLS, evaluate
from ..cli import print_json
from ..core.errors import UserError
from .eval_dense import register as register_dense


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
    knn.set_defaults(run=run)

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
    linear.set_defaults(run=run)

    lowshot = protocols.add_parser(
        "lowshot", help="logistic regression on 1 %% and 10 %% of the labels, 3 seeds",
        description="Low-shot (DINO Table 12, iBOT Table 4): scikit-learn logistic regression on L2-normalised "
        "features of 1 % and 10 % of each class of train, 3 seeds; test top-1 mean +/- std.")
    common(lowshot)
    lowshot.add_argument("--fractions", default="0.01,0.1", help="shares of the training labels")
    lowshot.add_argument("--seeds", type=int, default=3, help="number of random label subsets per share")
    lowshot.add_argument("--lambd", type=float, default=1e-4,
                         help="L2 penalty on the mean loss (iBOT's lambda; its 0.1 over-regularises small data)")
    lowshot.set_defaults(run=run)

    cluster = protocols.add_parser(
        "cluster", help="k-means (k = classes) on the test split: ACC, NMI, ARI, FMI",
        description="k-means with k = the number of classes on L2-normalised test features (iBOT Table 5): ACC "
        "(Hungarian matching of clusters to classes), NMI, ARI and FMI.")
    common(cluster)
    cluster.add_argument("--seed", type=int, default=0, help="k-means seed (10 restarts)")
    cluster.set_defaults(run=run)

    retrieval = protocols.add_parser(
        "retrieval", help="test images query the train set by cosine: mAP, recall@1/5",
        description="Each test image ranks the train images by cosine similarity; same class = relevant. "
        "Reports mAP over the full ranking and recall@1/5 (a relevant image among the k nearest).")
    common(retrieval)
    retrieval.set_defaults(run=run)
    register_dense(protocols, run)


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


def run(args: argparse.Namespace) -> int:
    """Any protocol: its flags are `selfsup.evaluate`'s options of the same names."""
    known = inspect.signature(PROTOCOLS[args.protocol]).parameters
    options = {k: getattr(args, k) for k in known if k != "t"}
    if "k" in options:
        options["k"] = parse_ks(options["k"])
    if options.get("lrs") is not None:
        options["lrs"] = parse_list(options["lrs"], "--lrs", float, 0.0)
    if "fractions" in options:
        options["fractions"] = parse_list(options["fractions"], "--fractions", float, 0.0)
    result = evaluate(args.checkpoint, args.protocol, args.data, device=args.device, random_init=args.random_init,
                      cache=not args.no_cache, size=getattr(args, "size", None), **options)
    print("\n".join(result.pop("text")))
    if args.json:
        print_json(result)
    return 0
