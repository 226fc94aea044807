"""`selfsup train`: pretrain a backbone, then report its k-NN beside random init and raw pixels."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..config import Config, apply, load_recipe, parse_override, recipe_path
from ..data.builtin import BUILTIN
from ..methods import check_method

log = logging.getLogger("selfsup")


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a backbone with a self-supervised method",
        description="Pretrain a backbone. With no arguments: DINO on a small ViT-tiny on the built-in MNIST 5k, on "
        "the CPU, then the teacher's k-NN accuracy beside random init and raw pixels.",
        epilog="Any config key can be set as key.sub=value, e.g. optim.lr=1e-3 crops.n_local=4 dino.out_dim=4096. "
        "Without --config, the recipe is <method>_mnist5k for built-in data and <method>_imagenet otherwise. "
        "Under torchrun (torchrun --nproc-per-node N -m selfsup train ...) every process trains its share of the "
        "global batch with DDP, or FSDP2 with train.distributed=fsdp. SIGTERM/SIGINT save a checkpoint and exit; "
        "--resume continues.",
    )
    p.add_argument("--config", help="a recipe: YAML file, or the name of a shipped one (e.g. dinov2_vits8)")
    p.add_argument("--method", help="simclr | moco | byol | dino | ibot | dinov2 | distill (default: dino)")
    p.add_argument("--arch", help="backbone: vit_tiny | vit_small | vit_base | vit_large | vit_giant2 | resnet18 | resnet50")
    p.add_argument("--patch-size", type=int, help="ViT patch size")
    p.add_argument("--data", help="mnist5k | digits | a folder of images | webdataset shards (default: mnist5k)")
    p.add_argument("--out", help="run folder (default: runs/<method>-<arch>-<data>, a new one for each run)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="length of the run in epochs")
    length.add_argument("--steps", type=int, help="length of the run in optimiser steps")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or the latest default run folder)")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from pretrained weights: a selfsup run folder or checkpoint (heads included when the "
                   "method and shapes match), a backbone export, or official DINO/DINOv2 weights; the backbone "
                   "architecture is taken from it")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(run=run)


def flag_overrides(args: argparse.Namespace) -> dict:
    flags = {
        "method": args.method,
        "backbone": {"arch": args.arch, "patch_size": args.patch_size},
        "data": {"source": args.data},
        "optim": {"epochs": args.epochs, "steps": args.steps, "batch_size": args.batch_size},
        "train": {"device": args.device},
    }
    clean = lambda d: {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}  # noqa: E731
    out = clean(flags)
    if args.epochs is not None:
        out["optim"]["steps"] = None
    return out


def default_recipe(method: str, data: str) -> str:
    kind = "mnist5k" if data in BUILTIN else "imagenet"
    return f"{method}_{kind}"


def resolve_config(args: argparse.Namespace) -> tuple[Config, str]:
    cfg = Config()
    flags = flag_overrides(args)
    overrides = [parse_override(o) for o in args.overrides]
    method = flags.get("method") or next((o["method"] for o in overrides if "method" in o), None)
    data = flags.get("data", {}).get("source") or "mnist5k"
    if method is not None:
        check_method(method)  # before the recipe lookup, whose error would name a recipe instead
    recipe = args.config
    if recipe is None:
        recipe = default_recipe(method or "dino", data)
        recipe_path(recipe)  # a clear error if this method has no recipe for this kind of data
    load_recipe(cfg, recipe)
    apply(cfg, flags, "command line")
    for o in overrides:
        apply(cfg, o, "command line")
    return cfg, recipe


def run_folder(cfg: Config, explicit: str | None, resume: bool) -> Path:
    if explicit:
        return Path(explicit)
    data = Path(cfg.data.source).name or "data"
    base = Path("runs") / f"{cfg.method}-{cfg.backbone.arch}-{data}"
    if resume:  # the latest run of this kind
        existing = sorted(Path("runs").glob(base.name + "*"), key=lambda p: p.stat().st_mtime) if Path("runs").exists() else []
        return existing[-1] if existing else base
    out, n = base, 1
    while out.exists() and any(out.iterdir()):
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def print_table(table: dict, cfg: Config) -> None:
    spec = cfg.data.eval_source or cfg.data.source
    print(f"\nweighted k-NN (k={cfg.eval.k}, T={cfg.eval.temperature}) on the test split of {spec}:")
    kept = {"dino": "teacher backbone", "ibot": "teacher backbone", "dinov2": "teacher backbone", "distill": "student EMA"}
    rows = [(f"trained ({kept.get(cfg.method, 'backbone')})", "trained"),
            ("same architecture, random init", "random_init"), ("raw pixels", "raw_pixels")]
    for label, key in rows:
        r = table[key]
        print(f"  {label:<32} top-1 {r['top1']:6.2f} %   top-5 {r['top5']:6.2f} %")


def run(args: argparse.Namespace) -> int:
    from ..eval.run import final_table
    from ..methods import resolve_init
    from ..train import distributed
    from ..train.trainer import Interrupted, Trainer

    cfg, recipe = resolve_config(args)
    init = resolve_init(cfg, args.init_from) if args.init_from else None
    out = run_folder(cfg, args.out, args.resume)
    log.info("recipe %s -> run folder %s", recipe, out)
    try:
        trainer = Trainer(cfg, out, resume=args.resume)
        if init is not None:  # a resumed run then continues from its own checkpoint instead
            log.info("--init-from %s: loaded %s", args.init_from, init(trainer.method))
        result = trainer.fit()
    except Interrupted as e:
        log.warning(str(e))
        return e.exit_code
    finally:
        distributed.shutdown()  # torchrun's process group, if any: the evaluation below is rank 0's alone
    if not result:  # not the main process
        return 0
    table = final_table(trainer.method.backbone(), cfg, trainer.device) if cfg.eval.final else None
    result["knn"] = table
    (out / "results.json").write_text(json.dumps(result, indent=2))
    if table is not None:
        print_table(table, cfg)
    print(f"\nrun folder: {out}  (backbone.safetensors, checkpoints, metrics.jsonl, config.yaml, results.json)")
    if args.json:
        from ..cli import print_json

        print_json(result)
    return 0
