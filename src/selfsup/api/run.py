"""`selfsup.train(...)`: pretrain a backbone, then its k-NN beside random init and raw pixels; `selfsup train`
calls it."""
from __future__ import annotations

import json
import logging
import math
import sys
import time as clock
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config, apply, flat, highres_crops, load_recipe, parse_override, shipped_recipe, validate
from ..core import distributed
from ..core.device import resolve_device
from ..core.errors import UserError
from ..core.machine import process_start, usable_cores
from ..core.progress import format_duration
from ..data.builtin import BUILTIN
from ..eval.run import attention_table, final_table, knn_of_backbone
from ..methods import method_class
from ..training.auto import CPU_TIME, fitted, profile
from ..training.checkpoint import latest
from ..training.runlog import RunLog
from ..training.trainer import Collapsed, Interrupted, Trainer, training_source
from ..weights import Loaded, load, resolve_init, save_backbone

log = logging.getLogger("selfsup")


@dataclass
class Request:
    """What `train` was asked: the named arguments, config sections as dicts (`optim={"lr": 1e-3}`) and
    key=value overrides (`"optim.lr=1e-3"`), applied in that order over the recipe."""

    data: str | None = None
    method: str | None = None
    out: str | Path | None = None
    config: str | None = None
    arch: str | None = None
    patch_size: int | None = None
    epochs: float | None = None
    steps: int | None = None
    time: str | None = None
    batch_size: int | None = None
    device: str | None = None
    resume: bool = False
    init_from: str | Path | None = None
    overrides: tuple[str, ...] = ()
    section_values: dict[str, Any] = field(default_factory=dict)

    def flags(self) -> dict:
        lengths = [k for k in ("epochs", "steps", "time") if getattr(self, k) is not None]
        if len(lengths) > 1:
            raise UserError(f"{' and '.join(lengths)}: give one length of the run")
        flags = {
            "method": self.method,
            "backbone": {"arch": self.arch, "patch_size": self.patch_size},
            "data": {"source": None if self.data is None else str(self.data)},
            "optim": {"epochs": self.epochs, "steps": self.steps, "batch_size": self.batch_size},
            "train": {"device": self.device, "time": self.time},
            "init": {"checkpoint": None if self.init_from is None else str(self.init_from)},
        }
        clean = lambda d: {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}  # noqa: E731
        out = clean(flags)
        if self.epochs is not None or self.time is not None:
            out.setdefault("optim", {})["steps"] = None
        if self.epochs is not None or self.steps is not None:
            out.setdefault("train", {})["time"] = None
        return out

    def sections(self) -> list[dict]:
        bad = [k for k, v in self.section_values.items() if not isinstance(v, dict)]
        if bad:
            raise UserError(f"train({bad[0]}=...): a config section is given as a dict, e.g. optim={{'lr': 1e-3}}")
        return [{k: v} for k, v in self.section_values.items()]


@dataclass
class Run:
    """A finished (or stopped) run: its folder, the config it trained with, and its results."""

    path: Path
    config: Config
    results: dict | None  # results.json: steps, collapse warnings, the final k-NN table; None on ranks other than 0
    exit_code: int = 0  # 0; 3 stopped on a collapse; 130/143 interrupted (a checkpoint is kept: resume=True)
    summary: str = ""  # what the command prints at the end

    def load(self) -> Loaded:
        """The trained backbone (`selfsup.load` of the run folder)."""
        return load(self.path)

    @property
    def knn(self) -> dict | None:
        """The final k-NN table: trained, random_init and raw_pixels, each top1/top5 in %."""
        return (self.results or {}).get("knn")


def train(data: str | Path | None = None, method: str | None = None, out: str | Path | None = None, *,
          config: str | None = None, arch: str | None = None, patch_size: int | None = None,
          epochs: float | None = None, steps: int | None = None, time: str | None = None,
          batch_size: int | None = None, device: str | None = None, resume: bool = False,
          init_from: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **sections: dict) -> Run:
    """Pretrain a backbone, as `selfsup train` does: a recipe (`config`, else the one for `data` and `method`, or
    one fitted to a folder and this machine), then the named arguments, then `sections` (`optim={"lr": 1e-3}`)
    and `overrides` ("optim.lr=1e-3"). Returns the `Run`; a bad value raises `selfsup.errors.UserError` before
    anything is written."""
    request = Request(data, method, out, config, arch, patch_size, epochs, steps, time, batch_size, device, resume,
                      init_from, tuple(overrides), sections)
    started = process_start()
    run_log = RunLog()  # holds what is said until the run folder exists
    try:
        return _train(request, started, run_log)
    finally:
        run_log.close()


def _train(request: Request, started: float, run_log: RunLog) -> Run:
    resolved = resolve_config(request)
    out = run_folder(resolved.cfg, request.out, request.resume)
    resuming = request.resume and (out / "config.yaml").exists()
    if resuming:  # the run's own plan: its fitted recipe, batch, length and --init-from phases
        resolved = resolve_config(request, saved=out / "config.yaml")
    cfg = resolved.cfg
    # a resumed run continues from its own checkpoint; one without any yet starts as it would have
    init = resolve_init(cfg, cfg.init.checkpoint) if cfg.init.checkpoint and not (resuming and latest(out)) else None
    log.info("recipe %s -> run folder %s", resolved.recipe, out)
    for line in resolved.why:
        log.info("  %s", line)
    log.info("  %s", describe(cfg))
    trainer = None
    try:
        trainer = Trainer(cfg, out, resume=request.resume, run_log=run_log, evaluate=knn_of_backbone)
        if init is not None:
            log.info("init.checkpoint %s: loaded %s", cfg.init.checkpoint, init(trainer.method))
        result = trainer.fit(resolved.choose_batch, started)
    except Interrupted as e:
        log.warning(str(e))
        return Run(out, cfg, None, e.exit_code)
    except Collapsed as e:
        print(f"selfsup: {e}", file=sys.stderr)
        run_log.write(str(e))
        return Run(out, cfg, None, e.exit_code)
    finally:
        if trainer is not None:
            trainer.close()
        distributed.shutdown()  # torchrun's process group, if any: the evaluation below is rank 0's alone
    if not result:  # not the main process
        return Run(out, trainer.cfg, None)
    save_backbone(trainer.method.backbone(), trainer.cfg, out / "backbone.safetensors")
    table = final_table(trainer.method.backbone(), cfg, trainer.device) if cfg.eval.final else None
    trainer.log_final(table)  # to train.loggers, which it closes
    result["knn"] = table
    result["attention_masks"] = attention_table(trainer.method.backbone(), cfg, trainer.device) if cfg.eval.final \
        else None
    result["seconds"] = round(clock.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    said = (f"\n{table_text(table, cfg)}\n" if table is not None else "") + (
        f"{attention_text(result['attention_masks'])}\n" if result["attention_masks"] else "") + (
        f"\nrun folder: {out}  (backbone.safetensors, checkpoints, metrics.jsonl, config.yaml, results.json, train.log)"
        f"\ntook {format_duration(result['seconds'])}")
    run_log.write(said)
    return Run(out, trainer.cfg, result, 0, said)


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


def resolve_config(request: Request, saved: Path | None = None) -> Resolved:
    """The run's config: a recipe (shipped, a file, or for a folder without `config` one fitted to the data and
    the machine; `saved`: a run's own config.yaml, to resume), then the named arguments, then the sections and
    key=value overrides."""
    cfg = Config()
    flags = request.flags()
    overrides = [*request.sections(), *(parse_override(o) for o in request.overrides)]
    user = merged(flags, *overrides)
    validate_user(user)  # before the recipe lookup, whose error would name a recipe instead of a bad method
    method = user.get("method")
    data = user.get("data", {}).get("source") or "mnist5k"
    out = Resolved(cfg, request.config or str(saved or ""))
    if saved is not None:
        load_recipe(cfg, str(saved))
    elif request.config is None and default_recipe(method or "dino", data) is None:
        out = fit_recipe(method or "dino", data, user)
        cfg = out.cfg
    else:
        out.recipe = request.config or default_recipe(method or "dino", data)
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
    validate(probe, only=set(flat(user)))


def fit_recipe(method: str, data: str, user: dict) -> Resolved:
    """A recipe fitted to the images of `data` and to this machine (training/auto.py)."""
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
