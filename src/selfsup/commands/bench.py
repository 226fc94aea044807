"""`selfsup bench`: images/s and peak memory of training or inference steps, FlashAttention on vs off."""
from __future__ import annotations

import argparse

from ..config import Config, apply, load_recipe, parse_override


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time training or inference steps (images/s, peak memory), e.g. FlashAttention on vs off",
        description="Time training or inference steps: images/s (median over the timed steps after warm-up) and "
        "peak memory (CUDA max allocated, or the process's peak RSS on the CPU). With --attention both, the flash "
        "and math backends run interleaved in one run and their ratio is reported. Without --method, the backbone "
        "alone is timed on random images; with it, the method's whole training step on multi-crop views.",
        epilog="Config keys can be set as key.sub=value, e.g. backbone.drop_path=0.4 crops.n_local=2 "
        "dino.out_dim=4096.",
    )
    p.add_argument("--arch", default="vit_small", help="vit_tiny | vit_small | vit_base | vit_large | vit_giant2")
    p.add_argument("--patch-size", type=int, default=16, help="ViT patch size")
    p.add_argument("--img-size", type=int, default=224, help="image (global crop) size")
    p.add_argument("--depth", type=int, help="fewer blocks than the architecture has (quick measurements)")
    p.add_argument("--mode", choices=["train", "infer"], default="train",
                   help="train: forward, backward and optimiser step; infer: forward in eval mode, no gradients")
    p.add_argument("--attention", choices=["flash", "math", "both", "efficient", "auto"], default="both",
                   help="scaled_dot_product_attention backend; both: flash and math, and their ratio")
    p.add_argument("--method", help="time this method's training step (dino, ibot, ...) instead of the backbone alone")
    p.add_argument("--config", help="a recipe for --method (YAML file or shipped name)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(run=run)


def bench_config(args: argparse.Namespace) -> Config:
    cfg = Config()
    if args.config:
        load_recipe(cfg, args.config)
    flags = {"backbone": {"arch": args.arch, "patch_size": args.patch_size, "img_size": args.img_size},
             "crops": {"global_size": args.img_size}, "optim": {"batch_size": args.batch_size},
             "train": {"device": args.device, "compile": args.compile, "precision": args.dtype}}
    if args.depth is not None:
        flags["backbone"]["depth"] = args.depth
    if args.method:
        flags["method"] = args.method
    apply(cfg, flags, "command line")
    for o in args.overrides:
        apply(cfg, parse_override(o), "command line")
    return cfg


def run(args: argparse.Namespace) -> int:
    from ..bench import Setting, measure, ratio
    from ..cli import print_json

    cfg = bench_config(args)
    backends = ["flash", "math"] if args.attention == "both" else [args.attention]
    settings = {a: Setting(attention=a, dtype=args.dtype) for a in backends}
    result = measure(cfg, args.mode, settings, args.steps, args.warmup, method=bool(args.method))
    what = f"{cfg.method} training step" if result["method"] else f"backbone {args.mode}"
    depth = f", depth {result['depth']}" if result["depth"] else ""
    print(f"{args.arch}/{args.patch_size} at {args.img_size}{depth}, {what}, batch {args.batch_size}, "
          f"{result['device']}, {args.dtype}{', compiled' if args.compile else ''}: "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    for name, r in result["variants"].items():
        print(f"  {name:<9} {r['images_per_s']:9.2f} images/s   peak memory {r['peak_memory_mib']:8.0f} MiB")
    if args.attention == "both":
        result["ratio_flash_math"] = ratio(result, "flash", "math")
        print(f"  flash / math: {result['ratio_flash_math']:.2f}x")
    if args.json:
        print_json(result)
    return 0
