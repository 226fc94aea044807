"""`selfsup report` on a small hand-made run folder: one self-contained HTML page, PNGs beside it."""
import json

import numpy as np
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.config import Config, save
from selfsup.nn import backbone_from_config
from selfsup.weights import save_backbone


def test_report_has_curves_tables_and_figures(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config()
    cfg.backbone.arch, cfg.backbone.patch_size, cfg.backbone.depth, cfg.backbone.img_size = "vit_tiny", 8, 1, 32
    cfg.crops.global_size = 32
    save(cfg, run / "config.yaml")
    torch.manual_seed(0)
    save_backbone(backbone_from_config(cfg.backbone), cfg, run / "backbone.safetensors")
    rows = [{"step": s, "loss": 9 - s / 10, "lr": 1e-4, "teacher_entropy": 8.0, "kl": 0.5} for s in range(1, 6)]
    rows.insert(3, {"step": 3, "knn_top1": 41.5, "knn_top5": 80.0})
    rows.insert(5, {"step": 4, "warning": "collapse", "monitor": "teacher_entropy", "value": 8.21,
                    "message": "teacher entropy 8.21 near log K = 8.32 (uniform) for 100 steps: <lower the lr>"})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 6, \"lo")  # torn line
    (run / "results.json").write_text(json.dumps({"knn": {"trained": {"top1": 55.25, "top5": 90.0},
                                                          "random_init": {"top1": 31.0, "top5": 70.0}}}))
    (run / "eval").mkdir()
    (run / "eval" / "cluster-mnist5k.json").write_text(json.dumps(
        {"protocol": "cluster", "data": "mnist5k", "random_init": False, "features": "cls",
         "acc": 61.5, "nmi": 50.0, "ari": 40.0, "fmi": 45.0}))
    (run / "eval" / "linear-mnist5k.json").write_text(json.dumps(
        {"protocol": "linear", "data": "mnist5k", "random_init": False, "features": "all", "best": "cls+avgpool",
         "top1": 72.25, "top5": 95.5, "kinds": {"cls": {"lr": 0.01, "val_top1": 70.0, "top1": 69.75, "top5": 94.0},
                                                "cls+avgpool": {"lr": 0.1, "val_top1": 71.0, "top1": 72.25,
                                                                "top5": 95.5}}}))
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((32, 48, 3)) * 255).astype(np.uint8)).save(
            tmp_path / "imgs" / f"p{i}.png")
    assert main(["report", str(run), str(tmp_path / "imgs"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = sorted(p.split("/")[-1] for p in r["pngs"])
    assert names == sorted(["curve-loss.png", "curve-lr.png", "curve-teacher_entropy.png", "curve-kl.png",
                            "curve-knn_top1.png", "attention.png", "attention-random-init.png", "pca.png"])
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(names)  # self-contained
    assert all((run / "report" / n).exists() for n in names)
    assert "55.25" in page and "ACC 61.50 %" in page and "p1" not in page.split("<h2>")[0]
    # the linear probe: its line among the evaluations, then each feature kind
    assert "top-1 72.25 %, top-5 95.50 % (cls+avgpool, lr 0.1)" in page
    assert "<tr><td>cls+avgpool (chosen on val)</td><td>0.1</td><td>71.00</td><td>72.25</td><td>95.50</td></tr>" in page
    # the collapse warning stands out above the sections, escaped; the curves skipped its row
    top = page.split("<h2>")[0]
    assert "class=warn" in top and "<b>step 4</b>, collapse: teacher entropy 8.21 near log K = 8.32" in top
    assert "&lt;lower the lr&gt;" in top
    assert "selfsup bench --checkpoint RUN" in page  # not timed yet: how to
    assert main(["report", str(tmp_path / "imgs")]) == 2  # not a run folder
