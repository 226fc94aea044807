"""Throughput and peak memory of training and inference steps: what `selfsup bench` and
benchmarks/throughput.py measure.

Variants of one run (attention backend, packing, drop-path kind, precision) share one model and are timed
interleaved, A B A B ..., so that a machine shared with other work slows them alike; each reports the median
over its timed steps after warm-up. Ratios between variants of one run are the figures to trust.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .config import Config
from .core.device import autocast, resolve_device, synchronize
from .core.errors import UserError
from .core.io import atomic_write
from .core.machine import PeakMemory
from .data.views import MultiCrop, Photometric, synthetic_views
from .methods import method_class
from .nn import backbone_from_config
from .nn.attention import set_attention_backend
from .nn.vit import Block, VisionTransformer
from .training.optim import build_optimizer
from .training.trainer import Trainer
from .weights import load, run_backbone_file


@dataclass(frozen=True)
class Setting:
    """What differs between the variants of one run."""

    attention: str = "auto"  # auto | flash | math | efficient
    packing: bool = True  # forward_features_list: one packed forward, or one per group of crops
    drop_path_efficient: bool = True  # rates > 0.1: the branch skips dropped samples (DINOv2)
    dtype: str = "fp32"  # fp32 | bf16 autocast


def apply_setting(model: nn.Module, s: Setting, device: torch.device) -> None:
    set_attention_backend(model, s.attention, device)
    for m in model.modules():
        if isinstance(m, VisionTransformer):
            m.packing = s.packing
        elif isinstance(m, Block):
            m.drop_path_efficient = s.drop_path_efficient


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    out = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def time_variants(steps: dict[str, Callable[[], None]], n_steps: int, warmup: int,
                  device: torch.device) -> dict[str, dict]:
    """Per variant: seconds of each timed step and peak memory. Variants alternate step by step."""
    memory = PeakMemory(device)
    seconds: dict[str, list[float]] = {k: [] for k in steps}
    peak = {k: 0.0 for k in steps}
    for i in range(warmup + n_steps):
        for name, step in steps.items():
            synchronize(device)
            memory.reset()
            t = time.perf_counter()
            step()
            synchronize(device)
            dt = time.perf_counter() - t
            peak[name] = max(peak[name], memory.read())
            if i >= warmup:
                seconds[name].append(dt)
    return {k: {"step_s": [round(s, 4) for s in v], "median_step_s": statistics.median(v),
                "peak_memory_mib": round(peak[k], 1)} for k, v in seconds.items()}


@dataclass
class Workload:
    """A model and the step to time. `batch_images` is what one step processes (images/s = it / step time)."""

    model: nn.Module
    step: Callable[[], None]
    batch_images: int
    device: torch.device


def backbone_workload(cfg: Config, mode: str, device: torch.device, backbone: nn.Module | None = None) -> Workload:
    """The backbone alone on random images of the global crop size: `train` is forward, backward and an AdamW
    step on the mean square of its outputs; `infer` is the forward of the [CLS] feature in eval mode.
    `backbone` (a trained one) replaces a fresh one built from `cfg.backbone`."""
    model = (backbone if backbone is not None else backbone_from_config(cfg.backbone)).to(device)
    size, b = cfg.crops.global_size, cfg.optim.batch_size
    x = torch.randn(b, cfg.backbone.in_chans, size, size, device=device)
    if mode == "infer":
        model.eval()
        forward = torch.compile(model) if cfg.train.compile else model

        def step() -> None:
            with torch.inference_mode(), autocast(device, cfg.train.precision):
                forward(x)

        return Workload(model, step, b, device)
    model.train()
    optimizer = build_optimizer({"backbone": model}, cfg, device)
    for g in optimizer.param_groups:
        g["lr"] = 1e-6

    def features(images: torch.Tensor) -> torch.Tensor:
        return model.forward_features(images)["x_prenorm"]

    forward = torch.compile(features) if cfg.train.compile else features

    def step() -> None:
        with autocast(device, cfg.train.precision):
            loss = forward(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Workload(model, step, b, device)


def method_workload(cfg: Config, device: torch.device) -> Workload:
    """The trainer's own training step of `cfg.method` (photometric augmentation on the device, forward,
    backward, clipping, optimiser, EMA), on fixed multi-crop views of random images; after the
    last-layer freeze, so every parameter is updated."""
    cfg.data.source = "digits"  # the trainer wants a source; the timed steps use synthetic views
    cfg.optim.steps = 1000
    trainer = Trainer(cfg, Path(tempfile.gettempdir()) / "selfsup-bench-unused")
    trainer.step = max(trainer.first_full_step, trainer.total_steps // 2)
    trainer.compile()
    views = synthetic_views(trainer.multicrop, cfg.optim.batch_size)
    trainer.method.train()
    return Workload(trainer.method, lambda: trainer.train_step(views), cfg.optim.batch_size, device)


def measure(cfg: Config, mode: str, settings: dict[str, Setting], n_steps: int, warmup: int,
            method: bool = False, backbone: nn.Module | None = None) -> dict:
    """Images/s and peak memory of each variant, and flash over math when both are timed. `cfg` describes the
    model (backbone, method, crops, batch, device, compile); `mode` is train or infer. With `method`, train mode
    times `cfg.method`'s whole training step; otherwise (and in infer mode) the backbone alone, `backbone` if
    given."""
    if mode not in ("train", "infer"):
        raise UserError(f"--mode {mode}: expected train or infer")
    if n_steps < 1 or warmup < 0:
        raise UserError(f"--steps {n_steps} / --warmup {warmup}: expected at least 1 timed step and no negative warm-up")
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    method = method and mode == "train"
    work = method_workload(cfg, device) if method else backbone_workload(cfg, mode, device, backbone)

    def variant(s: Setting) -> Callable[[], None]:
        def run() -> None:
            apply_setting(work.model, s, device)
            cfg.train.precision = s.dtype  # the trainer reads it at each step
            work.step()

        return run

    timed = time_variants({k: variant(s) for k, s in settings.items()}, n_steps, warmup, device)
    for k, r in timed.items():
        r["images_per_s"] = round(work.batch_images / r["median_step_s"], 2)
        r["setting"] = asdict(settings[k])
    b = cfg.backbone
    result = {"mode": mode, "method": cfg.method if method else None, "arch": b.arch,
              "patch_size": b.patch_size, "depth": b.depth, "img_size": cfg.crops.global_size,
              "batch_size": cfg.optim.batch_size, "drop_path": b.drop_path, "compile": cfg.train.compile,
              "device": str(device), "steps": n_steps, "warmup": warmup, "variants": timed, "machine": machine()}
    if {"flash", "math"} <= set(timed):
        result["ratio_flash_math"] = ratio(result, "flash", "math")
    return result


def ratio(result: dict, a: str, b: str) -> float:
    v = result["variants"]
    return round(v[a]["images_per_s"] / v[b]["images_per_s"], 3)


def measure_run(run: Path, cfg: Config, settings: dict[str, Setting], n_steps: int, warmup: int,
                modes: tuple[str, ...] = ("train", "infer")) -> dict:
    """A training run's own model at its own crop sizes (`cfg`: its config, batch and device as they are to be
    timed): `train` is the method's whole training step on multi-crop views, `infer` the run's trained backbone
    (a fresh one of its architecture while the run has no weights yet) forward at the global crop size, in
    eval mode. Each mode times the variants of `settings` interleaved."""
    weights = run_backbone_file(run)
    out: dict = {}
    for mode in modes:
        backbone = load(run).backbone if mode == "infer" and weights is not None else None
        out[mode] = measure(copy.deepcopy(cfg), mode, settings, n_steps, warmup, method=True, backbone=backbone)
        info = out[mode].pop("machine")  # the same in every mode: recorded once
    first, c, b = out[modes[0]], cfg.crops, cfg.backbone
    return {"run": str(run), "weights": str(weights) if weights is not None else None, "method": cfg.method,
            "arch": b.arch, "patch_size": b.patch_size, "depth": b.depth,
            "crops": {"n_global": c.n_global, "global_size": c.global_size, "n_local": c.n_local,
                      "local_size": c.local_size},
            "batch_size": first["batch_size"], "device": first["device"],
            "dtypes": sorted({s.dtype for s in settings.values()}), "compile": first["compile"],
            "steps": n_steps, "warmup": warmup, "machine": info, **out}


def save_result(result: dict, path: Path) -> None:
    """`result` as JSON at `path`, atomically: a reader sees the old file or the whole new one."""
    atomic_write(path, json.dumps(result, indent=2))


MODE_NAMES = {"train": "training step", "infer": "inference"}


def run_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per timed mode) of a `measure_run` result: images/s and peak memory per variant,
    and flash / math when both were timed; cells formatted for printing."""
    modes = [m for m in MODE_NAMES if m in result]
    names = list(result[modes[0]]["variants"])
    both = all("ratio_flash_math" in result[m] for m in modes)
    header = ["", *(f"images/s {n}" for n in names), *(["flash / math"] if both else []),
              *(f"peak MiB {n}" for n in names)]
    rows = []
    for m in modes:
        v = result[m]["variants"]
        rows.append([MODE_NAMES[m], *(f"{v[n]['images_per_s']:.1f}" for n in names),
                     *([f"{result[m]['ratio_flash_math']:.2f}x"] if both else []),
                     *(f"{v[n]['peak_memory_mib']:.0f}" for n in names)])
    return header, rows


def run_summary(result: dict) -> str:
    """One line: what a `measure_run` result timed, and on which machine."""
    c, m = result["crops"], result["machine"]
    local = f" + {c['n_local']} x {c['local_size']} px" if c["n_local"] else ""
    depth = f" (depth {result['depth']})" if result["depth"] else ""
    threads = m["torch_threads"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_count']} cores, {threads} torch thread{'s' * (threads != 1)}"
    return (f"{result['method']}, {result['arch']}/{result['patch_size']}{depth}, crops {c['n_global']} x "
            f"{c['global_size']} px{local}, batch {result['batch_size']}, {result['device']}, "
            f"{'/'.join(result['dtypes'])}{', compiled' if result['compile'] else ''}: median of {result['steps']} "
            f"steps after {result['warmup']} warm-up, on {where}, torch {m['torch']}")


@dataclass
class PipelineResult:
    multicrop_images_per_s: float
    photometric_images_per_s: float
    crops: dict = field(default_factory=dict)


def input_pipeline(cfg: Config, source, n_images: int, device: torch.device, repeats: int = 3) -> PipelineResult:
    """Images/s of the two halves of the input pipeline on their own: `MultiCrop` (loader side, one process)
    on the first `n_images` of `source`, and `Photometric` (batched on `device`) on the views it made."""
    multicrop = MultiCrop(cfg.crops, cfg.train.seed)
    photometric = Photometric(cfg.crops, method_class(cfg.method).blur_kernel)
    samples = [(*source[i], i) for i in range(n_images)]
    t_crop, t_photo = [], []
    for r in range(repeats):
        t = time.perf_counter()
        views = multicrop(samples, r).to(device)
        t_crop.append(time.perf_counter() - t)
        synchronize(device)
        t = time.perf_counter()
        photometric(views.global_crops)
        if views.local_crops is not None:
            photometric(views.local_crops)
        synchronize(device)
        t_photo.append(time.perf_counter() - t)
    c = cfg.crops
    return PipelineResult(round(n_images / float(np.median(t_crop)), 1), round(n_images / float(np.median(t_photo)), 1),
                          {"n_global": c.n_global, "global_size": c.global_size, "n_local": c.n_local,
                           "local_size": c.local_size})
