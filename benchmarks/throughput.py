"""Throughput benchmarks: each suite writes benchmarks/results/<suite>.json (with the machine's description)
and prints its figures; `--table` prints the README's table from the latest results.

    nice -n 10 python benchmarks/throughput.py attention packing drop_path   # or: all
    python benchmarks/throughput.py --table

Variants of one suite run interleaved in one process (see selfsup.bench), so their ratios hold even on a
shared machine; absolute images/s depend on the load. ViT-S/8 at 224 runs at depth 3 by default (--full: 12).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selfsup.bench import Setting, input_pipeline, machine, measure, ratio, time_variants
from selfsup.config import Config, apply, load_recipe

RESULTS = Path(__file__).parent / "results"


def config(arch="vit_small", patch=16, img=224, depth=None, batch=4, recipe=None, **sections) -> Config:
    cfg = Config()
    if recipe:
        load_recipe(cfg, recipe)
    apply(cfg, {"backbone": {"arch": arch, "patch_size": patch, "img_size": img, "depth": depth},
                "crops": {"global_size": img}, "optim": {"batch_size": batch}, "train": {"device": "cpu"}}, "bench")
    apply(cfg, sections, "bench")
    return cfg


def attention(args) -> dict:
    """FlashAttention on vs off, ViT-S/8 at 224: training and inference."""
    depth = None if args.full else 3
    both = {"flash": Setting("flash"), "math": Setting("math")}
    out = {}
    for mode in ("train", "infer"):
        r = measure(config(patch=8, depth=depth, batch=4, backbone={"drop_path": 0.0}), mode, both, args.steps, 1)
        out[mode] = {"result": r, "flash_over_math": ratio(r, "flash", "math")}
    return {"what": f"ViT-S/8 at 224{'' if args.full else ', depth 3'}, batch 4, fp32", "target": ">= 1.3 (train)",
            **out}


def packing(args) -> dict:
    """The DINO training step (2 x 224 + 8 x 96 crops) with the student's crops packed in one forward vs one
    forward per crop size."""
    depth = None if args.full else 4
    cfg = config(depth=depth, batch=4, method="dino")
    r = measure(cfg, "train", {"packed": Setting(packing=True), "separate": Setting(packing=False)}, args.steps, 1,
                method=True)
    return {"what": f"DINO step, ViT-S/16{'' if args.full else ' depth 4'}, 2 x 224 + 8 x 96, batch 4, fp32",
            "target": ">= 1.0 on CPU", "result": r, "packed_over_separate": ratio(r, "packed", "separate")}


def drop_path(args) -> dict:
    """Stochastic depth at rate 0.4 in every block (DINOv2's uniform rate): the branch on the kept samples
    only vs multiplying dropped ones by zero. Batch 10 keeps exactly 6 samples (the rate)."""
    depth = None if args.full else 6
    cfg = config(depth=depth, batch=10, backbone={"drop_path": 0.4, "drop_path_uniform": True})
    r = measure(cfg, "train", {"efficient": Setting(drop_path_efficient=True),
                               "plain": Setting(drop_path_efficient=False)}, args.steps, 1)
    return {"what": f"ViT-S/16{'' if args.full else ' depth 6'} at 224, drop path 0.4 uniform, batch 10, fp32",
            "target": ">= 1.2", "result": r, "efficient_over_plain": ratio(r, "efficient", "plain")}


def precision(args) -> dict:
    """bf16 autocast vs fp32 on this machine (CPUs without native bf16 emulate it)."""
    cfg = config(depth=3, batch=8, backbone={"drop_path": 0.0})
    r = measure(cfg, "train", {"bf16": Setting(dtype="bf16"), "fp32": Setting(dtype="fp32")}, args.steps, 1)
    return {"what": "ViT-S/16 depth 3 at 224, batch 8, train", "result": r, "bf16_over_fp32": ratio(r, "bf16", "fp32")}


def fused_adamw(args) -> dict:
    """One AdamW step over ViT-S/16's parameters: fused, foreach, for-loop."""
    from selfsup.nn.vit import vit

    model = vit("vit_small", patch_size=16)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kinds = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
    opts = {k: torch.optim.AdamW(model.parameters(), lr=1e-8, **kw) for k, kw in kinds.items()}
    timed = time_variants({k: o.step for k, o in opts.items()}, args.steps, 1, torch.device("cpu"))
    med = {k: v["median_step_s"] for k, v in timed.items()}
    return {"what": "AdamW step, ViT-S/16 parameters (21.7 M)", "result": timed,
            "fused_over_foreach": round(med["foreach"] / med["fused"], 3)}


def input(args) -> dict:
    """The input pipeline on its own (MultiCrop on one loader process, Photometric batched on the device) vs the
    training step it feeds, for the default recipe on MNIST 5k, and ImageNet-size crops of the skimage photos."""
    from selfsup.data.builtin import open_source

    out = {}
    cfg = Config()
    load_recipe(cfg, "dino_mnist5k")  # the recipe's own backbone, crops and batch
    apply(cfg, {"train": {"device": "cpu"}}, "bench")
    pipe = input_pipeline(cfg, open_source("mnist5k", "train"), 256, torch.device("cpu"))
    step = measure(cfg, "train", {"auto": Setting()}, args.steps, 1, method=True)
    train_ips = step["variants"]["auto"]["images_per_s"]
    out["mnist5k_recipe"] = {"pipeline": vars(pipe), "train_images_per_s": train_ips,
                             "loader_workers": cfg.data.num_workers,
                             "input_bound": pipe.multicrop_images_per_s * cfg.data.num_workers < train_ips}
    imagenet = config(recipe="dino_imagenet")
    photos = open_source("skimage")
    out["imagenet_crops_on_skimage"] = {"pipeline": vars(input_pipeline(imagenet, photos, len(photos),
                                                                          torch.device("cpu")))}
    return {"what": "images/s of MultiCrop (1 process) and Photometric (batched), and of the training step",
            **out, "machine": machine()}


def packing_technique(args) -> dict:
    """How to attend over packed sequences on this CPU (forward + backward of attention alone, DINO ViT-S/16
    shapes, batch 4: 8 x 197 + 32 x 37 tokens): per-group SDPA (what selfsup does), one SDPA over the
    concatenation with a dense block-diagonal mask, nested jagged tensors, FlexAttention."""
    heads, dim = 6, 64
    shapes = [(8, 197), (32, 37)]
    g = torch.Generator().manual_seed(0)
    groups = [[torch.randn(b, heads, n, dim, generator=g, requires_grad=True) for _ in range(3)] for b, n in shapes]
    seq = torch.cat([torch.arange(b).repeat_interleave(n) + 1000 * i for i, (b, n) in enumerate(shapes)])
    mask = seq[:, None] == seq[None, :]
    offsets = torch.cumsum(torch.tensor([0] + [n for b, n in shapes for _ in range(b)]), 0)

    def packed(i: int) -> torch.Tensor:  # [sum B N, heads, dim]
        return torch.cat([grp[i].transpose(1, 2).flatten(0, 1) for grp in groups])

    def per_group() -> torch.Tensor:
        return sum(F.scaled_dot_product_attention(*grp).sum() for grp in groups)

    def dense_mask() -> torch.Tensor:
        q, k, v = (packed(i).transpose(0, 1)[None] for i in range(3))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum()

    def nested_jagged() -> torch.Tensor:
        q, k, v = (torch.nested.nested_tensor_from_jagged(packed(i), offsets=offsets).transpose(1, 2)
                   for i in range(3))
        return F.scaled_dot_product_attention(q, k, v).values().sum()

    def flex() -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block = create_block_mask(lambda b, h, qi, ki: seq[qi] == seq[ki], None, None, len(seq), len(seq), "cpu")
        q, k, v = (packed(i).transpose(0, 1)[None] for i in range(3))
        return flex_attention(q, k, v, block_mask=block).sum()

    steps, failed = {}, {}
    for name, fn in {"per_group": per_group, "dense_mask": dense_mask, "nested_jagged": nested_jagged,
                     "flex": flex}.items():
        try:
            fn().backward()
            steps[name] = lambda fn=fn: fn().backward()
        except Exception as e:  # noqa: BLE001 - a technique this torch build cannot run is a finding
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    timed = time_variants(steps, args.steps, 0, torch.device("cpu"))
    base = timed["per_group"]["median_step_s"]
    return {"what": "attention over packed sequences, forward + backward", "result": timed, "failed": failed,
            "slowdown_vs_per_group": {k: round(v["median_step_s"] / base, 2) for k, v in timed.items()}}


SUITES = {f.__name__: f for f in (attention, packing, drop_path, precision, fused_adamw, input, packing_technique)}


def headline(suite: str, r: dict) -> list[tuple[str, str]]:
    """(what, figure) rows for the README table."""
    ips = lambda res, k: res["variants"][k]["images_per_s"]  # noqa: E731
    if suite == "attention":
        return [(f"{r['what']}, {m}: flash / math",
                 f"{r[m]['flash_over_math']:.2f}x ({ips(r[m]['result'], 'flash'):.1f} vs "
                 f"{ips(r[m]['result'], 'math'):.1f} img/s)") for m in ("train", "infer")]
    if suite == "packing":
        return [(f"{r['what']}: packed / separate", f"{r['packed_over_separate']:.2f}x ({ips(r['result'], 'packed'):.2f}"
                 f" vs {ips(r['result'], 'separate'):.2f} img/s)")]
    if suite == "drop_path":
        return [(f"{r['what']}: efficient / plain", f"{r['efficient_over_plain']:.2f}x "
                 f"({ips(r['result'], 'efficient'):.1f} vs {ips(r['result'], 'plain'):.1f} img/s)")]
    if suite == "precision":
        return [(f"{r['what']}: bf16 / fp32", f"{r['bf16_over_fp32']:.2f}x")]
    if suite == "fused_adamw":
        return [(f"{r['what']}: fused vs foreach", f"{r['fused_over_foreach']:.2f}x faster")]
    if suite == "input":
        m = r["mnist5k_recipe"]
        i = r["imagenet_crops_on_skimage"]["pipeline"]
        return [("MNIST 5k recipe: MultiCrop / Photometric / training step",
                 f"{m['pipeline']['multicrop_images_per_s']:.0f} / {m['pipeline']['photometric_images_per_s']:.0f} / "
                 f"{m['train_images_per_s']:.0f} img/s (input-bound: {'yes' if m['input_bound'] else 'no'})"),
                ("ImageNet crops (2 x 224 + 8 x 96) of skimage photos: MultiCrop / Photometric",
                 f"{i['multicrop_images_per_s']:.1f} / {i['photometric_images_per_s']:.1f} img/s")]
    if suite == "packing_technique":
        s = r["slowdown_vs_per_group"]
        return [("packed attention, fwd+bwd time vs per-group SDPA",
                 ", ".join(f"{k} {v:.1f}x" for k, v in s.items() if k != "per_group")
                 + "".join(f", {k}: fails" for k in r["failed"]))]
    return []


def table() -> str:
    rows = ["| benchmark | figure |", "|---|---|"]
    for suite in SUITES:
        path = RESULTS / f"{suite}.json"
        if path.exists():
            rows += [f"| {what} | {fig} |" for what, fig in headline(suite, json.loads(path.read_text()))]
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", help=f"{', '.join(SUITES)} or all")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--full", action="store_true", help="full-depth models (slow on a CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--table", action="store_true", help="print the README table of the latest results")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(SUITES) if args.suites == ["all"] else args.suites
    for name in names:
        if name not in SUITES:
            p.error(f"unknown suite '{name}' (expected {', '.join(SUITES)} or all)")
        t = time.perf_counter()
        result = SUITES[name](args)
        result.update(suite=name, command="python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
                      wall_s=round(time.perf_counter() - t, 1), machine=machine(),
                      date=time.strftime("%Y-%m-%d %H:%M"), load_average=list(_load()))
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        for what, fig in headline(name, result):
            print(f"{what}: {fig}", flush=True)
    if args.table:
        print(table())
    return 0


def _load() -> tuple[float, ...]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return ()


if __name__ == "__main__":
    sys.exit(main())
