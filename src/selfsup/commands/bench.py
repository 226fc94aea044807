"""`selfsup bench`: images/s and peak memory of training or inference steps, FlashAttention on vs off."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..bench import Setting, measure, measure_run, run_summary, run_table, save_result
from ..cli import print_json
from ..config import Config, apply, load_recipe, parse_override, validate
from ..core.errors import UserError
from .report import run_config

log = logging.getLogger("selfsup")

# the flags that describe the model, when it is not a run's (--checkpoint)
MODEL_FLAGS = {"arch": "--arch", "patch_size": "--patch-size", "img_size": "--img-size", "depth": "--depth",
               "method": "--method", "config": "--config"}
RUN_BATCH = 8  # --checkpoint: at most this many images per step unless --batch-size (a CPU-friendly default)


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time training or inference steps (images/s, peak memory), e.g. FlashAttention on vs off",
        description="Time training or inference steps: images/s (median over the timed steps after warm-up) and "
        "peak memory (CUDA max allocated, or the process's peak RSS on the CPU). With --attention both, the flash "
        "and math backends run interleaved in one run and their ratio is reported. Without --method, the backbone "
        "alone is timed on random images; with it, the method's whole training step on multi-crop views. "
        "With --checkpoint RUN, the run's own model is timed at its own crop sizes, precision and device (from "
        "RUN/config.yaml): the method's training step and the trained backbone's inference, saved as "
        "RUN/bench.json for `selfsup report`.",
        epilog="Config keys can be set as key.sub=value, e.g. backbone.drop_path=0.4 crops.n_local=2 "
        "dino.out_dim=4096; with --checkpoint they apply on top of the run's config.",
    )
    p.add_argument("--checkpoint", metavar="RUN",
                   help="a run folder of `selfsup train`: time its training step and its backbone's inference; "
                   "the model flags (--arch, --patch-size, --img-size, --depth, --method, --config) are then an "
                   "error, the model being the run's")
    p.add_argument("--arch", help="vit_tiny | vit_small | vit_base | vit_large | vit_giant2 (default: vit_small)")
    p.add_argument("--patch-size", type=int, help="ViT patch size (default: 16)")
    p.add_argument("--img-size", type=int, help="image (global crop) size (default: 224)")
    p.add_argument("--depth", type=int, help="fewer blocks than the architecture has (quick measurements)")
    p.add_argument("--mode", choices=["train", "infer"],
                   help="train: forward, backward and optimiser step; infer: forward in eval mode, no gradients "
                   "(default: train; with --checkpoint both)")
    p.add_argument("--attention", choices=["flash", "math", "both", "efficient", "auto"], default="both",
                   help="scaled_dot_product_attention backend; both: flash and math, and their ratio")
    p.add_argument("--method", help="time this method's training step (dino, ibot, ...) instead of the backbone alone")
    p.add_argument("--config", help="a recipe for --method (YAML file or shipped name)")
    p.add_argument("--batch-size", type=int,
                   help=f"images per step (default: 8; with --checkpoint the run's batch, at most {RUN_BATCH})")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (with --checkpoint: on as well when the run trained with train.compile)")
    p.add_argument("--dtype", choices=["fp32", "bf16"],
                   help="bf16: autocast (default: fp32; with --checkpoint the run's train.precision)")
    p.add_argument("--device", help="auto | cpu | cuda (default: auto; with --checkpoint the run's train.device)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(run=run)


def given(value: Any, default: Any) -> Any:
    """A flag's value, or `default` where it was not given."""
    return default if value is None else value


def bench_config(args: argparse.Namespace) -> Config:
    cfg = Config()
    if args.config:
        load_recipe(cfg, args.config)
    img_size = given(args.img_size, 224)
    flags = {"backbone": {"arch": given(args.arch, "vit_small"), "patch_size": given(args.patch_size, 16),
                          "img_size": img_size},
             "crops": {"global_size": img_size}, "optim": {"batch_size": given(args.batch_size, 8)},
             "train": {"device": given(args.device, "auto"), "compile": args.compile,
                       "precision": given(args.dtype, "fp32")}}
    if args.depth is not None:
        flags["backbone"]["depth"] = args.depth
    if args.method:
        flags["method"] = args.method
    apply(cfg, flags, "command line")
    for o in args.overrides:
        apply(cfg, parse_override(o), "command line")
    validate(cfg)
    return cfg


def checkpoint_config(args: argparse.Namespace) -> Config:
    """The run's config, then the overrides, then the flags that keep their meaning (batch, device, dtype)."""
    model_flags = [flag for key, flag in MODEL_FLAGS.items() if getattr(args, key) is not None]
    if model_flags:
        raise UserError(f"bench --checkpoint times the run's own model: drop {', '.join(model_flags)} (or bench "
                        "without --checkpoint)")
    cfg = run_config(Path(args.checkpoint))
    for o in args.overrides:
        apply(cfg, parse_override(o), "command line")
    t = cfg.train
    apply(cfg, {"optim": {"batch_size": given(args.batch_size, min(cfg.optim.batch_size, RUN_BATCH))},
                "train": {"device": given(args.device, t.device), "precision": given(args.dtype, t.precision),
                          "compile": args.compile or t.compile}}, "command line")
    validate(cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = checkpoint_config(args) if args.checkpoint else bench_config(args)
    dtype = cfg.train.precision
    backends = ["flash", "math"] if args.attention == "both" else [args.attention]
    settings = {a: Setting(attention=a, dtype=dtype) for a in backends}
    if args.checkpoint:
        return run_checkpoint(args, cfg, settings)
    mode = args.mode or "train"
    result = measure(cfg, mode, settings, args.steps, args.warmup, method=bool(args.method))
    b = cfg.backbone
    what = f"{cfg.method} training step" if result["method"] else f"backbone {mode}"
    depth = f", depth {result['depth']}" if result["depth"] else ""
    print(f"{b.arch}/{b.patch_size} at {cfg.crops.global_size}{depth}, {what}, batch {cfg.optim.batch_size}, "
          f"{result['device']}, {dtype}{', compiled' if args.compile else ''}: "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    for name, r in result["variants"].items():
        print(f"  {name:<9} {r['images_per_s']:9.2f} images/s   peak memory {r['peak_memory_mib']:8.0f} MiB")
    if "ratio_flash_math" in result:
        print(f"  flash / math: {result['ratio_flash_math']:.2f}x")
    if args.json:
        print_json(result)
    return 0


def run_checkpoint(args: argparse.Namespace, cfg: Config, settings: dict) -> int:
    """Time the run's training step and inference, print the table and save RUN/bench.json."""
    run_dir = Path(args.checkpoint)
    result = measure_run(run_dir, cfg, settings, args.steps, args.warmup,
                         (args.mode,) if args.mode else ("train", "infer"))
    print(f"{run_dir}: {run_summary(result)}")
    header, rows = run_table(result)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    try:
        save_result(result, run_dir / "bench.json")
        print(f"wrote {run_dir / 'bench.json'} (shown by `selfsup report {run_dir}`)")
    except OSError as e:  # a read-only run folder: the figures are still printed
        log.warning("%s: bench.json not written (%s)", run_dir, e.strerror or type(e).__name__)
    if args.json:
        print_json(result)
    return 0
