"""Collapse study on the built-in MNIST 5k, on the CPU: the DINO paper's Fig. 7 and Table 7 (row 2), and
BYOL without its predictor (BYOL Table 5b).

Variants, all with the same small ViT, data, schedule and budget:
  dino               centring + sharpening + momentum teacher: learns
  no_centering       sharpening only (centre frozen at 0): one prototype wins, teacher entropy -> 0
  no_sharpening      centring only (teacher temperature = student temperature 0.1): uniform, entropy -> log K
  no_momentum        the teacher is a copy of the student (lambda = 0): collapse, k-NN near chance
  byol               BYOL with its predictor: learns
  byol_no_predictor  BYOL without the predictor: the projections collapse to a constant

Prints a table, writes benchmarks/results/collapse.json and collapse.png (collapse_<steps>steps_lr<lr>.* for
other steps or lr; a run of some variants updates theirs in the file of its settings) (teacher entropy and
KL = H(P_t, P_s) - H(P_t) per step, as DINO Fig. 7, the spread of BYOL's target projections, and the k-NN
top-1 of every variant every 100 steps).

    nice -n 10 python benchmarks/collapse.py [--steps 300] [--lr 0.004] [--only dino no_momentum]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from selfsup.config import Config, apply, load_recipe
from selfsup.core.io import read_metrics
from selfsup.eval.run import knn_of_backbone
from selfsup.nn import backbone_from_config
from selfsup.training.trainer import Trainer

RESULTS = Path(__file__).parent / "results"
# every variant is the default recipe (dino_mnist5k: 2-block ViT-tiny, BatchNorm head with K = 1024 prototypes,
# tau_t 0.04, momentum 0.99, batch 64) at patch 7 and lr 1e-3, with one ingredient changed; BYOL shares its
# backbone and crops at its own recipe's lr
COMMON = {
    "backbone": {"patch_size": 7},  # 4 x 4 tokens: attention has room to collapse or not
    "byol": {"hidden_dim": 256, "out_dim": 64},
    "train": {"threads": 1},  # one compute thread + one loader process: faster than 2 on shared cores
    "eval": {"final": False, "every": 100},
}
STEPS = 300
DINO_LR = 0.004  # x 64 / 256 = 1e-3
BYOL_LR = 0.001  # x 64 / 256 = 2.5e-4, byol_mnist5k's (at 1e-3 BYOL itself falls below random init: 48.5 %)
VARIANTS = {
    "dino": ("dino", {}),
    "no_centering": ("dino", {"dino": {"center_momentum": 1.0}}),  # c stays 0
    "no_sharpening": ("dino", {"teacher": {"temp": 0.1, "warmup_temp": 0.1}}),  # tau_t = tau_s
    "no_momentum": ("dino", {"teacher": {"momentum": 0.0, "momentum_end": 0.0}}),  # theta_t <- theta_s
    "byol": ("byol", {"crops": {"n_local": 0}}),
    "byol_no_predictor": ("byol", {"crops": {"n_local": 0}, "byol": {"predictor": False}}),
}


def variant_config(name: str, steps: int, dino_lr: float = DINO_LR) -> Config:
    method, extra = VARIANTS[name]
    cfg = Config()
    load_recipe(cfg, "dino_mnist5k")
    lr = dino_lr if method == "dino" else BYOL_LR
    apply(cfg, {"method": method, **COMMON, "optim": {"steps": steps, "lr": lr}}, "collapse")
    apply(cfg, extra, f"collapse variant {name}")
    return cfg


K = variant_config("dino", 1).dino.out_dim  # the recipe's prototypes (1024: log K = 6.93)


def curves(run: Path) -> dict[str, list[float]]:
    """Per training step: loss, teacher entropy, KL, target spread; per evaluation: k-NN top-1."""
    rows = read_metrics(run / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    out = {k: [r[k] for r in train] for k in ("step", "loss", "teacher_entropy", "kl", "target_std")
           if any(k in r for r in train)}
    evals = [r for r in rows if "knn_top1" in r]
    out.update(knn_step=[r["step"] for r in evals], knn_top1=[r["knn_top1"] for r in evals])
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for name, r in results["variants"].items():
        c = r["curves"]
        axes[3].plot([0, *c["knn_step"]], [results["random_init_knn_top1"], *c["knn_top1"]], marker="o", label=name)
        if "teacher_entropy" in c:
            axes[0].plot(c["step"], c["teacher_entropy"], label=name)
            axes[1].plot(c["step"], c["kl"], label=name)
        if "target_std" in c:
            axes[2].plot(c["step"], c["target_std"], label=f"{name} (k-NN {r['knn_top1']:.0f} %)")
    axes[0].axhline(math.log(K), color="gray", ls="--", lw=1, label="log K")
    axes[0].set(title="teacher entropy h(P_t) (nats)", xlabel="step")
    axes[1].set(title="KL = H(P_t, P_s) - h(P_t)", xlabel="step")
    axes[2].set(title="BYOL: spread of the target projections", xlabel="step", ylabel="mean std of z'/|z'|")
    axes[3].axhline(10, color="gray", ls=":", lw=1, label="chance")
    axes[3].set(title="k-NN top-1 (%) of the backbone (step 0: random init)", xlabel="step", ylim=(0, 100))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not axes[2].lines:
        axes[2].set_visible(False)  # no BYOL variant in this run
    fig.suptitle(f"Collapse study on MNIST 5k ({results['steps']} steps, batch 64, ViT-tiny/7 x 2 blocks, K = {K})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--lr", type=float, default=DINO_LR, help="base lr of the DINO variants (x batch / 256)")
    p.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--runs", default="runs/benchmark-collapse")
    args = p.parse_args()
    torch.set_num_threads(1)
    stem = "collapse" if (args.steps, args.lr) == (STEPS, DINO_LR) else f"collapse_{args.steps}steps_lr{args.lr:g}"
    out_json, out_png = RESULTS / f"{stem}.json", RESULTS / f"{stem}.png"
    results = json.loads(out_json.read_text()) if out_json.exists() and len(args.only) < len(VARIANTS) else {}
    results.update(steps=args.steps, dino_lr=args.lr, byol_lr=BYOL_LR, log_k=math.log(K))
    variants = results.setdefault("variants", {})
    device = torch.device("cpu")
    baseline = None
    t_all = time.perf_counter()
    for name in args.only:
        cfg = variant_config(name, args.steps, args.lr)
        out = Path(args.runs) / name
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, out, evaluate=knn_of_backbone)  # k-NN every eval.every steps
        trainer.fit()
        knn = knn_of_backbone(trainer.method.backbone(), cfg, device, k=20)
        if baseline is None:
            torch.manual_seed(cfg.train.seed)
            baseline = knn_of_backbone(backbone_from_config(cfg.backbone, drop_path=0.0), cfg, device)["top1"]
        c = curves(out)
        c["knn_step"].append(args.steps)
        c["knn_top1"].append(knn["top1"])
        final = {k: sum(v[-10:]) / len(v[-10:]) for k, v in c.items() if not k.endswith(("step", "knn_top1"))}
        variants[name] = {"knn_top1": knn["top1"], "final": final, "seconds": round(time.perf_counter() - t0, 1),
                          "curves": c}
        print(f"{name:18s} k-NN {knn['top1']:6.2f} %  " + "  ".join(f"{k} {v:.3f}" for k, v in final.items()),
              flush=True)
    results["random_init_knn_top1"] = baseline
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1))
    plot(results, out_png)
    print(f"\n{'variant':18s} {'k-NN top-1':>10s} {'h(P_t)':>8s} {'KL':>8s} {'target std':>10s}   (log K = "
          f"{math.log(K):.2f}, random init k-NN {baseline:.2f} %, chance 10 %)")
    for name, r in variants.items():
        f = r["final"]
        cells = [f"{f[k]:8.3f}" if k in f else f"{'-':>8s}" for k in ("teacher_entropy", "kl")]
        std = f"{f['target_std']:10.4f}" if "target_std" in f else f"{'-':>10s}"
        print(f"{name:18s} {r['knn_top1']:10.2f} {cells[0]} {cells[1]} {std}")
    print(f"total {time.perf_counter() - t_all:.0f} s; {out_json}, {out_png}")


if __name__ == "__main__":
    main()
