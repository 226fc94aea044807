"""`selfsup train`: pretrain a backbone, then report its k-NN beside random init and raw pixels."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cli import print_json
from ..config import Config, apply, highres_crops, load_recipe, parse_override, shipped_recipe, validate
from ..core import distributed
from ..core.device import resolve_device
from ..core.machine import process_start, usable_cores
from ..core.progress import format_duration
from ..data.builtin import BUILTIN
from ..eval.run import attention_table, final_table, knn_of_backbone
from ..methods import method_class
from ..train.auto import CPU_TIME, fitted, profile
from ..train.runlog import RunLog
from ..train.trainer import Collapsed, Interrupted, Trainer, training_source
from ..weights import resolve_init, save_backbone

log = logging.getLogger("selfsup")


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a backbone with a self-supervised method",
        description="Pretrain a backbone. With no arguments: DINO on a small ViT-tiny on the built-in MNIST 5k, on "
        "the CPU, then the teacher's k-NN accuracy beside random init and raw pixels.",
        epilog="Any config key can be set as key.sub=value, e.g. optim.lr=1e-3 crops.n_local=4 dino.out_dim=4096. "
        "Without --config, the recipe is <method>_mnist5k for built-in data (<method>_scenes on scenes, where one "
        "exists); for a folder or shards it is fitted to "
        "the images (their median short side) and the machine: on a GPU the paper's <method>_imagenet with crops no "
        "larger than the images, on a CPU a small ViT for 10 minutes. Trial steps then fit the batch to the free "
        "memory and print an ETA; train.time (--time) sets the length from the measured speed; the collapse "
        "watchdog warns (train.stop_on_collapse=true: stops). "
        "Under torchrun (torchrun --nproc-per-node N -m selfsup train ...) every process trains its share of the "
        "global batch with DDP, or FSDP2 with train.distributed=fsdp. SIGTERM/SIGINT save a checkpoint and exit; "
        "--resume continues.",
    )
    p.add_argument("--config", help="a recipe: YAML file, or the name of a shipped one (e.g. dinov2_vits8)")
    p.add_argument("--method", help="simclr | moco | byol | dino | ibot | dinov2 | distill (default: dino)")
    p.add_argument("--arch", help="backbone: vit_tiny | vit_small | vit_base | vit_large | vit_giant2 | resnet18 | resnet50")
    p.add_argument("--patch-size", type=int, help="ViT patch size")
    p.add_argument("--data", help="mnist5k | digits | scenes | a folder of images | webdataset shards | an image "
                   "list (.txt, e.g. curate's selected.txt) (default: mnist5k)")
    p.add_argument("--out", help="run folder (default: runs/<method>-<arch>-<data>, a new one for each run)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="length of the run in epochs")
    length.add_argument("--steps", type=int, help="length of the run in optimiser steps")
    length.add_argument("--time", metavar="DURATION",
                        help="length of the whole command, final evaluation included (90s, 10m, 2h): the steps are "
                        "set from the speed of trial steps")
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
        "train": {"device": args.device, "time": args.time},
    }
    clean = lambda d: {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}  # noqa: E731
    out = clean(flags)
    if args.epochs is not None or args.time is not None:
        out.setdefault("optim", {})["steps"] = None
    if args.epochs is not None or args.steps is not None:
        out.setdefault("train", {})["time"] = None
    return out


def merged(*dicts: dict) -> dict:
    """Nested dicts merged, later ones winning."""
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = merged(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def default_recipe(method: str, data: str) -> str | None:
    """The shipped recipe for built-in data (`<method>_scenes` on scenes, else `<method>_mnist5k`); None where the
    recipe is to be fitted (a folder, shards, or scenes for a method without a scenes recipe)."""
    if data == "scenes":
        return f"{method}_scenes" if shipped_recipe(f"{method}_scenes") is not None else None
    return f"{method}_mnist5k" if data in BUILTIN else None


@dataclass
class Resolved:
    cfg: Config
    recipe: str  # the recipe's name, or "fitted"
    why: list[str] = field(default_factory=list)  # how a fitted recipe was chosen
    choose_batch: bool = False  # the batch is selfsup's to lower if it does not fit


def resolve_config(args: argparse.Namespace, saved: Path | None = None) -> Resolved:
    """The run's config: a recipe (shipped, a file, or for a folder without --config one fitted to the data and
    the machine; `saved`: a run's own config.yaml, to resume), then the flags, then key=value overrides."""
    cfg = Config()
    flags = flag_overrides(args)
    overrides = [parse_override(o) for o in args.overrides]
    user = merged(flags, *overrides)
    validate_user(user)  # before the recipe lookup, whose error would name a recipe instead of a bad method
    method = user.get("method")
    data = user.get("data", {}).get("source") or "mnist5k"
    out = Resolved(cfg, args.config or str(saved or ""))
    if saved is not None:
        load_recipe(cfg, str(saved))
    elif args.config is None and default_recipe(method or "dino", data) is None:
        out = fit_recipe(method or "dino", data, user)
        cfg = out.cfg
    else:
        out.recipe = args.config or default_recipe(method or "dino", data)
        load_recipe(cfg, out.recipe)
    apply(cfg, flags, "command line")
    for o in overrides:
        apply(cfg, o, "command line")
    validate(cfg)  # ranges, choices and keys that depend on each other, before any folder, data or model
    cores = usable_cores()
    if cfg.data.num_workers >= cores:  # loader processes beside the training process never exceed the cores
        out.why.append(f"loader: data.num_workers {cfg.data.num_workers} -> {cores - 1} ({cores} usable cores)")
        cfg.data.num_workers = cores - 1
    return out


def validate_user(user: dict) -> None:
    """The command line's own values, each on its own, before they pick or steer a recipe."""
    probe = Config()
    apply(probe, user, "command line")
    validate(probe, only=set(dotted(user)))


def dotted(d: dict, prefix: str = "") -> list[str]:
    return [k for key, v in d.items() for k in (dotted(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])]


def fit_recipe(method: str, data: str, user: dict) -> Resolved:
    """A recipe fitted to the images of `data` and to this machine (train/auto.py)."""
    source = training_source(data)
    device = resolve_device(user.get("train", {}).get("device", "auto"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    recipe, over, why = fitted(method, profile(source), device, usable_cores(), user, name)
    cfg = Config()
    load_recipe(cfg, recipe)
    apply(cfg, over, f"recipe fitted to {data}")
    if cfg.optim.batch_size > len(source) // 2:  # a few batches per epoch at least
        cfg.optim.batch_size = max(1, 2 ** int(math.log2(max(1, len(source) // 2))))
        why.append(f"batch {cfg.optim.batch_size}: {len(source)} training images")
    length = user.get("optim", {}).keys() & {"epochs", "steps"} or user.get("train", {}).get("time")
    if device.type != "cuda" and not length:
        cfg.train.time = CPU_TIME
        why.append(f"length: {CPU_TIME} for the whole command on this CPU (--time, --epochs or --steps to change)")
    chosen = "batch_size" not in user.get("optim", {})
    return Resolved(cfg, "fitted", why, choose_batch=chosen)


def describe(cfg: Config) -> str:
    """The resolved recipe in one line."""
    b, c, o = cfg.backbone, cfg.crops, cfg.optim
    arch = f"{b.arch}/{b.patch_size}" + (f" ({b.depth} blocks)" if b.depth else "") if b.arch.startswith("vit") else b.arch
    crops = f"{c.n_global} x {c.global_size}" + (f" + {c.n_local} x {c.local_size}" if c.n_local else "")
    length = f"time {cfg.train.time}" if cfg.train.time else (f"{o.steps} steps" if o.steps else f"{o.epochs:g} epochs")
    if o.epoch_length and not o.steps:
        length += f" of {o.epoch_length} steps"
    if cfg.highres.steps:
        h = highres_crops(cfg)
        length += f" (high-resolution stage: highres.steps {cfg.highres.steps} at {h.global_size} + {h.local_size} px)"
    head = f", K {cfg.dino.out_dim}" if cfg.method in ("dino", "ibot", "dinov2", "distill") else ""
    threads = f" + {cfg.train.threads} thread(s)" if cfg.train.threads else ""
    return (f"{cfg.method}, {arch}, crops {crops}, batch {o.batch_size}, lr {o.lr:g} ({o.lr_scaling}), {length}{head}, "
            f"{cfg.data.num_workers} loader worker(s){threads}, {cfg.train.precision}, device {cfg.train.device}")


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


def table_text(table: dict, cfg: Config) -> str:
    spec = cfg.data.eval_source or cfg.data.source
    lines = [f"weighted k-NN (k={cfg.eval.k}, T={cfg.eval.temperature}) on the test split of {spec}:"]
    rows = [(f"trained ({method_class(cfg.method).keeps_label})", "trained"),
            ("same architecture, random init", "random_init"), ("raw pixels", "raw_pixels")]
    for label, key in rows:
        r = table[key]
        lines.append(f"  {label:<32} top-1 {r['top1']:6.2f} %   top-5 {r['top5']:6.2f} %")
    return "\n".join(lines)


def attention_text(table: dict) -> str:
    """The attention-mask Jaccard lines of a run on scenes (DINO Fig. 4)."""
    lines = ["[CLS] attention masks (60 % of the mass) against the objects of the test scenes, Jaccard:"]
    for label, key in (("trained", "trained"), ("same architecture, random init", "random_init")):
        r = table[key]
        lines.append(f"  {label:<32} best head {r['jaccard_best']:6.2f} %   mean over heads {r['jaccard_mean']:6.2f} %   "
                     f"on the objects {r['object_mass']:5.1f} % of the attention (they cover {r['object_area']:.1f} %)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    started = process_start()
    run_log = RunLog()  # holds what is said until the run folder exists
    try:
        return train(args, started, run_log)
    finally:
        run_log.close()


def train(args: argparse.Namespace, started: float, run_log: RunLog) -> int:
    resolved = resolve_config(args)
    out = run_folder(resolved.cfg, args.out, args.resume)
    if args.resume and (out / "config.yaml").exists():  # the run's own plan: its fitted recipe, batch and length
        resolved = resolve_config(args, saved=out / "config.yaml")
    cfg = resolved.cfg
    init = resolve_init(cfg, args.init_from) if args.init_from else None
    log.info("recipe %s -> run folder %s", resolved.recipe, out)
    for line in resolved.why:
        log.info("  %s", line)
    log.info("  %s", describe(cfg))
    trainer = None
    try:
        trainer = Trainer(cfg, out, resume=args.resume, run_log=run_log, evaluate=knn_of_backbone)
        if init is not None:  # a resumed run then continues from its own checkpoint instead
            log.info("--init-from %s: loaded %s", args.init_from, init(trainer.method))
        result = trainer.fit(resolved.choose_batch, started)
    except Interrupted as e:
        log.warning(str(e))
        return e.exit_code
    except Collapsed as e:
        print(f"selfsup: {e}", file=sys.stderr)
        run_log.write(str(e))
        return e.exit_code
    finally:
        if trainer is not None:
            trainer.close()
        distributed.shutdown()  # torchrun's process group, if any: the evaluation below is rank 0's alone
    if not result:  # not the main process
        return 0
    save_backbone(trainer.method.backbone(), trainer.cfg, out / "backbone.safetensors")
    table = final_table(trainer.method.backbone(), cfg, trainer.device) if cfg.eval.final else None
    result["knn"] = table
    result["attention_masks"] = attention_table(trainer.method.backbone(), cfg, trainer.device) if cfg.eval.final \
        else None
    result["seconds"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    said = (f"\n{table_text(table, cfg)}\n" if table is not None else "") + (
        f"{attention_text(result['attention_masks'])}\n" if result["attention_masks"] else "") + (
        f"\nrun folder: {out}  (backbone.safetensors, checkpoints, metrics.jsonl, config.yaml, results.json, train.log)"
        f"\ntook {format_duration(result['seconds'])}")
    print(said)
    run_log.write(said)
    if args.json:
        print_json(result)
    return 0
