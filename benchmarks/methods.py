"""k-NN of every method of the family at the same budget on the built-in MNIST 5k, on the CPU.

Each method trains with its shipped <method>_mnist5k recipe for the same number of epochs at the same batch
size on the same ViT-tiny/7 backbone (2 blocks; the distilled student has 1 and learns from the dinov2 run
made here), then the weighted k-NN (k=20, T=0.07) of the backbone each method keeps is measured on the test
split, beside the same architecture at random init and raw pixels. Writes benchmarks/results/methods_knn.json.

    nice -n 10 python benchmarks/methods.py [--epochs 5] [--only simclr byol]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from selfsup.config import Config, apply, load_recipe, to_dict
from selfsup.eval.features import pixel_features
from selfsup.eval.knn import knn_accuracy
from selfsup.data.builtin import labelled_splits
from selfsup.eval.run import knn_of_backbone
from selfsup.nn import backbone_from_config
from selfsup.training.trainer import Trainer

ORDER = ["simclr", "moco", "byol", "dino", "ibot", "dinov2", "distill"]
RESULTS = Path(__file__).parent / "results"


def method_config(method: str, epochs: float, runs: Path) -> Config:
    cfg = Config()
    load_recipe(cfg, f"{method}_mnist5k")
    common = {"optim": {"epochs": epochs, "steps": None, "batch_size": 128}, "eval": {"final": False},
              "train": {"threads": 1}}
    if method != "distill":
        common["backbone"] = {"depth": 2, "patch_size": 7}  # the same backbone for all
    else:
        common["distill"] = {"teacher": str(runs / "dinov2")}
    apply(cfg, common, "benchmarks/methods.py")
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=5.0)  # ~14 min on 2 cores; 2 epochs: margins of 1-2 points
    p.add_argument("--only", nargs="*", default=ORDER, choices=ORDER)
    p.add_argument("--runs", default="runs/benchmark-methods", help="where the runs are written")
    args = p.parse_args()
    runs = Path(args.runs)
    out_file = RESULTS / "methods_knn.json"
    table = json.loads(out_file.read_text()) if out_file.exists() else {}
    table["budget"] = {"epochs": args.epochs, "batch_size": 128, "data": "mnist5k (4000 train / 1000 test)",
                       "device": "cpu (2 shared cores)"}
    rows = table.setdefault("methods", {})
    device = torch.device("cpu")
    for method in [m for m in ORDER if m in args.only]:
        cfg = method_config(method, args.epochs, runs)
        out = runs / method
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, out)
        result = trainer.fit()
        seconds = time.perf_counter() - t0
        trained = knn_of_backbone(trainer.method.backbone(), cfg, device)
        torch.manual_seed(cfg.train.seed)
        random_init = knn_of_backbone(backbone_from_config(cfg.backbone, drop_path=0.0), cfg, device)
        rows[method] = {"knn_top1": trained["top1"], "knn_top5": trained["top5"],
                        "random_init_top1": random_init["top1"], "steps": result["steps"],
                        "train_seconds": round(seconds, 1), "images_per_s": round(result["steps"] * 128 / seconds, 1),
                        "backbone": to_dict(cfg.backbone)}
        print(f"{method:8s} k-NN top-1 {trained['top1']:6.2f} %  (random init {random_init['top1']:6.2f} %)  "
              f"{result['steps']} steps in {seconds:.0f} s", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(table, indent=2))
    if "raw_pixels_top1" not in table:
        train, test = labelled_splits("mnist5k")
        xtr, ytr = pixel_features(train, 28)
        xte, yte = pixel_features(test, 28)
        table["raw_pixels_top1"] = knn_accuracy(xtr, ytr, xte, yte, 20, 0.07)["top1"]
        out_file.write_text(json.dumps(table, indent=2))
    print(f"\n{'method':8s} {'k-NN top-1':>10s} {'random init':>12s}")
    for m, r in rows.items():
        print(f"{m:8s} {r['knn_top1']:10.2f} {r['random_init_top1']:12.2f}")
    print(f"raw pixels {table['raw_pixels_top1']:.2f}")


if __name__ == "__main__":
    main()
