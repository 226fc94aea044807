"""Continued pretraining from a backbone without its heads (issue 16 item 6; dinov2 issues #204, #431).

Starts from the default job's backbone (`selfsup train`: DINO, ViT-tiny, MNIST 5k) exported without heads and
continues DINO on the same data for --steps steps with fresh heads, with selfsup's warm-up (backbone frozen for
10 % of the run while the heads learn, then a 5 % ramp and layer-wise lr decay 0.9) and without it
(init.head_warmup_steps=0 init.warmup_steps=0 init.layerwise_decay=1), each with and without the recipe's own
lr warm-up. Prints the k-NN every 100 steps and writes benchmarks/results/continued.json.

    python benchmarks/continued.py --base runs/dino-vit_tiny-mnist5k      # about 8 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

NO_WARMUP = ["init.head_warmup_steps=0", "init.warmup_steps=0", "init.layerwise_decay=1"]
VARIANTS = {
    "head warm-up": [],
    "none": NO_WARMUP,
    "head warm-up, no lr warm-up": ["optim.warmup_epochs=0"],
    "none, no lr warm-up": ["optim.warmup_epochs=0", *NO_WARMUP],
}


def knn_curve(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: round(r["knn_top1"], 2) for r in rows if "knn_top1" in r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a finished default run (selfsup train) whose backbone is continued")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default="runs/continued")
    p.add_argument("--reuse", action="store_true", help="collect runs already in --out instead of training")
    args = p.parse_args()
    base = Path(args.base)
    start = json.loads((base / "results.json").read_text())["knn"]["trained"]["top1"]
    out: dict = {"base": str(base), "base_knn_top1": round(start, 2), "steps": args.steps, "variants": {}}
    for i, (name, extra) in enumerate(VARIANTS.items()):
        run = Path(args.out) / f"v{i}"
        if not args.reuse:
            subprocess.run([sys.executable, "-m", "selfsup", "train", "--init-from", str(base / "backbone.safetensors"),
                            "--steps", str(args.steps), "--out", str(run), "eval.every=100", *extra], check=True)
        final = json.loads((run / "results.json").read_text())["knn"]["trained"]["top1"]
        out["variants"][name] = {"overrides": extra, "knn_top1_by_step": knn_curve(run), "final_knn_top1": round(final, 2)}
        print(f"{name:<30} k-NN top-1 by step {knn_curve(run)}  final {final:.2f} (start {start:.2f})")
    result = Path(__file__).parent / "results" / "continued.json"
    result.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {result}")


if __name__ == "__main__":
    main()
