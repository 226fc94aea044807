"""The smallest DINO run that still exercises everything: a 1-block ViT on 16 px crops of sklearn's digits."""
from __future__ import annotations

import json
from pathlib import Path

from selfsup.config import Config, apply

ARGS = ["--data", "digits", "--batch-size", "8", "backbone.depth=1", "backbone.patch_size=4", "backbone.img_size=16",
        "crops.global_size=16", "crops.local_size=8", "crops.n_local=2", "dino.out_dim=256", "dino.hidden_dim=64",
        "dino.bottleneck_dim=32", "optim.warmup_epochs=0", "eval.final=false", "data.num_workers=0",
        "train.threads=1", "train.device=cpu"]


def tiny_config(method: str = "dino", steps: int = 5, **extra) -> Config:
    cfg = Config()
    values = {
        "method": method,
        "data": {"source": "digits", "num_workers": 0},
        "backbone": {"arch": "vit_tiny", "patch_size": 4, "depth": 1, "img_size": 16, "drop_path": 0.0},
        "crops": {"global_size": 16, "local_size": 8, "n_local": 2},
        "dino": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32},
        "optim": {"steps": steps, "batch_size": 8, "warmup_epochs": 0.0},
        "train": {"device": "cpu", "threads": 1},
        "eval": {"final": False},
    }
    for k, v in extra.items():
        values[k] = {**values[k], **v} if isinstance(v, dict) and k in values else v
    apply(cfg, values, "test")
    return cfg


def losses(run: Path) -> dict[int, float]:
    """Step -> loss of a run's metrics.jsonl (a step logged twice would be a bug: it raises)."""
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            assert row["step"] not in out, f"step {row['step']} logged twice"
            out[row["step"]] = row["loss"]
    return out
