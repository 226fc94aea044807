"""`selfsup report RUN_DIR`: one HTML page with a run's curves, evaluations, attention maps and PCA."""
from __future__ import annotations

import argparse
import html
import logging
from pathlib import Path

from ..cli import print_json
from ..config import Config, load_recipe
from ..core.device import resolve_device
from ..core.errors import UserError
from ..viz.attention import attention_figure, attention_maps
from ..viz.images import viz_images
from ..viz.pca import pca_figure, pca_maps
from ..weights import load

log = logging.getLogger("selfsup")


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="one HTML page for a run: curves, warnings, evaluations, timing, attention, PCA",
        description="Write RUN_DIR/report.html, self-contained (figures embedded), with the PNGs beside it in "
        "RUN_DIR/report/: the trainer's warnings (collapse, ...) in a box at the top; loss, lr, teacher entropy and "
        "KL curves; k-NN during training (train with eval.every=N); the final evaluation table (results.json and "
        "every `selfsup eval` result, each linear probe in full); FlashAttention on vs off (bench.json of `selfsup "
        "bench --checkpoint RUN_DIR`); attention maps of the trained and a random-init backbone, and PCA of patch "
        "features, for a few images.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of `selfsup train`")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders for the figures")
    p.add_argument("--data", help="take the figures' images from this source (default: the run's data, unless "
                   "IMAGE is given)")
    p.add_argument("--n", type=int, default=4, help="how many images to take from --data")
    p.add_argument("--size", type=int, help="shorter side fed to the model for the figures (default: training size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.set_defaults(run=run)


def run_config(run_dir: Path) -> Config:
    """The config a run folder of `selfsup train` was trained with (its config.yaml)."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run folder (expected config.yaml from `selfsup train`)")
    cfg = Config()
    load_recipe(cfg, str(run_dir / "config.yaml"))
    return cfg


def pictures(run_dir: Path, images, folder: Path, device, size: int | None) -> list[tuple[Path, str]]:
    """Attention maps (trained and random init) and PCA of the run's backbone, as PNGs in `folder`."""
    loaded = load(run_dir)
    size, mean, std = size or loaded.image_size, loaded.mean, loaded.std
    out = []
    for backbone, name, what in ((loaded.backbone, "attention.png", "trained backbone"),
                                 (loaded.random_init(seed=0), "attention-random-init.png", "same architecture, random init")):
        attention_figure(attention_maps(backbone, images, size, mean, std, device), folder / name)
        out.append((folder / name, f"[CLS] attention of the last block: {what}"))
    pca_figure(pca_maps(loaded.backbone, images, size, mean, std, device), folder / "pca.png")
    out.append((folder / "pca.png", "PCA of patch features, trained backbone"))
    return out


def run(args: argparse.Namespace) -> int:
    from ..viz import report  # matplotlib: out of every command's start-up

    run_dir = Path(args.run_dir)
    cfg = run_config(run_dir)
    if args.n < 1 or (args.size is not None and args.size < 1):
        raise UserError("report: --n and --size must be at least 1")
    folder = run_dir / "report"
    folder.mkdir(exist_ok=True)
    rows = report.metrics(run_dir)
    curves = report.curves(rows, folder)
    data = args.data or (None if args.images else cfg.data.eval_source or cfg.data.source)
    try:
        figures = pictures(run_dir, viz_images(args.images, data, args.n), folder, resolve_device(args.device),
                           args.size)
        pictures_html = "".join(report.figure(p, c, half=p.name.startswith("attention")) for p, c in figures)
    except UserError as e:  # no weights yet, or a backbone without attention: the rest of the page still helps
        log.warning("report: no attention/PCA figures (%s)", e)
        figures, pictures_html = [], f"<p>No figures: {html.escape(str(e))}</p>"
    b = cfg.backbone
    summary = (f"{cfg.method} on <code>{report.esc(cfg.data.source)}</code>, {report.esc(b.arch)}/{b.patch_size}"
               f"{f', depth {b.depth}' if b.depth else ''}, batch {cfg.optim.batch_size}, folder "
               f"<code>{report.esc(run_dir.resolve())}</code>")
    sections = [
        ("Training curves", "".join(report.figure(p, t) for p, t in curves) or "<p>No metrics.jsonl yet.</p>"),
        ("Final evaluation", report.final_table(run_dir)),
        ("Dense features: attention masks, segmentation, depth, video, copies", report.dense_section(run_dir)),
        ("FlashAttention on vs off", report.bench_section(run_dir)),
        ("What the backbone attends to", pictures_html),
        ("Configuration", f"<details><summary>config.yaml</summary><pre>"
                          f"{report.esc((run_dir / 'config.yaml').read_text())}</pre></details>"),
    ]
    path = run_dir / "report.html"
    path.write_text(report.page(f"selfsup report: {run_dir.name}", summary, sections, report.warnings_box(rows)))
    print(f"wrote {path} (figures in {folder})")
    if args.json:
        print_json({"html": str(path), "pngs": [str(p) for p, _ in curves + figures]})
    return 0
