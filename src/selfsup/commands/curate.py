"""`selfsup curate`: from an uncurated pile to a training set, as DINOv2 built LVD-142M (Sec. 3, Fig. 3): embed,
de-duplicate, retrieve near a curated set, and balance with hierarchical k-means (Vo et al. 2024)."""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .. import curate as cu
from ..cli import print_json
from ..core.device import resolve_device
from ..core.errors import UserError
from ..data.builtin import open_source
from ..data.channels import to_uint8
from ..data.shards import check_target, require_webdataset, write_shards
from ..eval.cache import FeatureCache, cache_folder
from ..eval.copydetect import Whitening, gem
from ..eval.features import extract
from ..viz.dense import grid
from ..weights import load

log = logging.getLogger("selfsup")
WHITENING_SAMPLE = 20000  # pool images that learn the copy-detection whitening (DINO fits it on 20k distractors)


def register(sub) -> None:
    p = sub.add_parser(
        "curate", help="select a training set from a pool: de-duplicate, retrieve, balance",
        description="DINOv2's data curation (Sec. 3): embed the pool with a backbone (features cached); with "
        "--dedup, remove near-duplicates (connected components of 'cosine >= threshold' over the copy-detection "
        "descriptor, the first image of each group kept); remove pool images too close to any --protect image; "
        "with --curated, keep the pool images near it (--per-query K nearest of each curated image, or the "
        "--clusters N k-means clusters holding their neighbours); with --balance N, sample N images evenly across "
        "hierarchical k-means clusters (Vo et al. 2024). Writes DIR/selected.txt (one pool image per line), "
        "DIR/removed.tsv, DIR/curation.json and PNG sample grids; --shards writes webdataset shards of the "
        "selection.")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, a checkpoint, a safetensors export, or an official DINO/DINOv2 .pth")
    p.add_argument("--pool", required=True, help="the uncurated images: a folder, shards, an image list (.txt), or a built-in set")
    p.add_argument("--curated", help="a curated set to retrieve near (needs --per-query or --clusters)")
    p.add_argument("--protect", action="append", default=[], metavar="SPEC",
                   help="an evaluation set whose near-copies are removed from the pool (repeatable)")
    p.add_argument("--dedup", action="store_true", help="remove near-duplicates within the pool")
    p.add_argument("--dedup-threshold", type=float, default=0.9,
                   help="cosine similarity of the dedup descriptor from which two images are copies (default 0.9)")
    p.add_argument("--protect-threshold", type=float,
                   help="the same for copies of --protect images (default: --dedup-threshold)")
    p.add_argument("--descriptor", choices=("copydetect", "cls"), default="copydetect",
                   help="dedup descriptor: [CLS] + GeM of the patch tokens, whitened (DINO copy detection), or the "
                   "[CLS] alone; centred either way (default copydetect)")
    p.add_argument("--dedup-crops", metavar="AREAS",
                   help="query-side augmentation of --dedup and --protect: also describe five crops (centre and "
                   "corners) of each image at each area fraction given, e.g. 0.9,0.8, and count a pair when a crop of "
                   "one is close to the other; finds cropped copies that whole-image descriptors miss, at 1 + 5 x "
                   "(number of areas) forward passes per pool and protected image (default: whole images only)")
    p.add_argument("--dedup-grid", type=int, metavar="K",
                   help="with --dedup-crops: crops at K x K evenly spaced positions instead of the centre and corners "
                   "(K = 3 adds the edges' middles); aligns with copies cropped anywhere, at 1 + K^2 x (number of "
                   "areas) forward passes per image")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--per-query", type=int, metavar="K", help="keep the K nearest pool images of each curated image")
    mode.add_argument("--clusters", type=int, metavar="N", help="k-means the pool into N clusters, keep those "
                      "holding a curated image's nearest pool image")
    p.add_argument("--per-cluster", type=int, help="with --clusters: at most this many images of each kept cluster")
    p.add_argument("--union", action="store_true", help="add the curated images to the selection (DINOv2 step 4)")
    p.add_argument("--balance", type=int, metavar="N", help="sample N images evenly across hierarchical k-means clusters")
    p.add_argument("--levels", help="clusters per level of the hierarchical k-means, finest first, e.g. 1000,100 "
                   "(default: about N/50 then a tenth of it)")
    p.add_argument("--resample-steps", type=int, default=10,
                   help="resampling steps per k-means level (default 10, as Vo et al.)")
    p.add_argument("--shards", metavar="DIR", help="also write the selection as webdataset shards in DIR")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, help="loader processes decoding images (default: as `selfsup embed`)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--json", action="store_true", help="print curation.json's summary as one JSON line")
    p.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    """Every bad value up front, before anything is embedded."""
    def positive(name: str, v) -> None:
        if v is not None and v < 1:
            raise UserError(f"--{name} {v}: expected at least 1")

    for name in ("per-query", "clusters", "per-cluster", "balance", "batch-size", "shard-size"):
        positive(name, getattr(args, name.replace("-", "_")))
    if args.resample_steps < 0:
        raise UserError(f"--resample-steps {args.resample_steps}: expected 0 or more")
    for name in ("dedup_threshold", "protect_threshold"):
        v = getattr(args, name)
        if v is not None and not -1.0 <= v <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} {v}: expected a cosine similarity in [-1, 1]")
    if args.dedup_crops is not None:
        args.dedup_crops = parse_areas(args.dedup_crops)
        if not args.dedup and not args.protect:
            raise UserError("--dedup-crops describes crops for --dedup and --protect: give one of them")
    if args.dedup_grid is not None:
        if args.dedup_crops is None:
            raise UserError("--dedup-grid places the crops of --dedup-crops: give --dedup-crops AREAS")
        if args.dedup_grid < 2:
            raise UserError(f"--dedup-grid {args.dedup_grid}: expected at least 2 positions per side")
    if args.curated and args.per_query is None and args.clusters is None:
        raise UserError("--curated: choose how to retrieve, --per-query K or --clusters N")
    if (args.per_query is not None or args.clusters is not None) and not args.curated:
        raise UserError("--per-query/--clusters retrieve near a curated set: give --curated SPEC")
    if args.per_cluster is not None and args.clusters is None:
        raise UserError("--per-cluster goes with --clusters N")
    if args.union and not args.curated:
        raise UserError("--union adds the curated images: give --curated SPEC")
    if args.levels is not None:
        args.levels = parse_levels(args.levels)
        if args.balance is None:
            raise UserError("--levels shapes the k-means of --balance N: give --balance")
    if args.shards:
        check_target(args.shards, "--shards")
        require_webdataset("--shards")


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--levels {text}: expected cluster counts separated by commas, e.g. 1000,100") from None
    if not levels or min(levels) < 1 or any(b >= a for a, b in itertools.pairwise(levels)):
        raise UserError(f"--levels {text}: expected decreasing positive counts, finest level first, e.g. 1000,100")
    return levels


def parse_areas(text: str) -> list[float]:
    try:
        areas = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--dedup-crops {text}: expected area fractions separated by commas, e.g. 0.9,0.8") from None
    if not areas or not all(0.0 < a < 1.0 for a in areas) or len(set(areas)) != len(areas):
        raise UserError(f"--dedup-crops {text}: expected distinct area fractions in (0, 1), e.g. 0.9,0.8")
    return areas


def default_levels(n: int) -> list[int]:
    """About 50 images per finest cluster, then a tenth as many clusters above (two levels where n allows)."""
    k1 = max(2, min(n // 50, 10000)) if n >= 4 else 1
    k2 = k1 // 10
    return [k1, k2] if k2 >= 2 else [k1]


def item_names(spec: str, source) -> list[str]:
    """How each image is named in selected.txt: its file path as the pool gives it, `shard.tar#key` in shards,
    `spec#i` in a built-in set."""
    files = getattr(source, "files", None)
    if files is not None:
        return [str(f) for f in files]
    keys = getattr(source, "keys", None)
    if keys is not None:
        return [f"{source.paths[int(s)]}#{k}" for s, k in zip(source.shard, keys)]
    return [f"{spec}#{i}" for i in range(len(source))]


class Embedder:
    """[CLS] and GeM of the patch tokens of every image of a source, through the feature cache."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.loaded = args, load(args.checkpoint)
        self.device = resolve_device(args.device)
        self.backbone = self.loaded.backbone.to(self.device).eval()
        self.cache = FeatureCache(None if args.no_cache else cache_folder(args.checkpoint), args.checkpoint)

    def __call__(self, spec: str, role: str, crops: list[float] | None = None, grid: int | None = None):
        """(source, features): "cls" and "gem" [N, D] of the evaluation view; with `crops`, also "cls@a/k" and
        "gem@a/k" of crop k (`crop_views` with `grid`) at area a of that view."""
        source = open_source(spec)
        loaded = self.loaded

        def describe(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            o = self.backbone.forward_features(x)
            return o["x_norm_clstoken"], gem(o["x_norm_patchtokens"])

        def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = dict(zip(("cls", "gem"), describe(x)))
            for a in crops or []:
                for k, view in enumerate(cu.crop_views(x, a, grid)):
                    out[f"cls@{a}/{k}"], out[f"gem@{a}/{k}"] = describe(view)
            return out

        settings = {"size": loaded.image_size, "mean": list(loaded.mean), "std": list(loaded.std), "kind": "cls+gem"}
        if crops:
            settings["crops"] = list(crops)
            if grid is not None:
                settings["grid"] = grid

        def compute():  # resumable: a stopped embedding of a large pool goes on from its last saved rows
            return extract(forward, source, loaded.image_size, self.device, self.args.batch_size, loaded.mean,
                           loaded.std, desc=f"curate: embed {role} {spec}", workers=self.args.workers,
                           resume=self.cache.partial(spec, "curate", source, **settings))

        feats, _ = self.cache.get(spec, "curate", source, compute, **settings)
        return source, feats


Described = tuple[torch.Tensor, list[torch.Tensor]]  # whole images [N, D], and each crop view [N, D]


def dedup_space(pool: dict, others: list[dict], kind: str) -> tuple[Described, list[Described], str]:
    """The descriptors de-duplication compares, for the pool and the protected sets alike, each as (whole images,
    crop views): DINO's copy-detection descriptor ([CLS] + GeM p=4, PCA-whitened on pool images, L2-normalised;
    eval_copy_detection.py) when the pool has enough images to learn the whitening (4 per dimension), else centred
    on the pool mean and normalised. Crop views go through the transform learnt on whole images."""
    def raw(f: dict, key: str = "") -> torch.Tensor:
        return torch.cat([f["cls" + key], f["gem" + key]], 1) if kind == "copydetect" else f["cls" + key]

    def views(f: dict) -> list[str]:
        return sorted({k[3:] for k in f if k.startswith("cls@")})

    x = raw(pool)
    fit = x[torch.linspace(0, len(x) - 1, min(len(x), WHITENING_SAMPLE)).round().long().unique()]
    if kind == "copydetect" and len(fit) >= 4 * x.shape[1]:
        transform, what = Whitening().fit(fit), "[CLS]+GeM, whitened"
    else:
        mean = fit.mean(0)
        transform = lambda v: torch.nn.functional.normalize(v - mean, dim=1)  # noqa: E731
        what = "[CLS]+GeM, centred" if kind == "copydetect" else "[CLS], centred"

    def described(f: dict) -> Described:
        return transform(raw(f)), [transform(raw(f, key)) for key in views(f)]

    return described(pool), [described(o) for o in others], what + (f", {len(views(pool))} crop views" if views(pool) else "")


def pair_similarity(x: torch.Tensor, views: list[torch.Tensor], i: np.ndarray, j: np.ndarray) -> torch.Tensor:
    """The similarity of pairs (i, j) as de-duplication sees it: the highest cosine of whole vs whole and of a crop
    view of either vs the other whole (normalised descriptors)."""
    i, j = torch.as_tensor(i, dtype=torch.long), torch.as_tensor(j, dtype=torch.long)
    best = (x[i] * x[j]).sum(1)
    for v in views:
        best = torch.maximum(best, torch.maximum((v[i] * x[j]).sum(1), (x[i] * v[j]).sum(1)))
    return best


def run(args: argparse.Namespace) -> int:
    check(args)
    out = Path(args.out)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    embed = Embedder(args)
    crops = args.dedup_crops if args.dedup or args.protect else None
    pool_source, pool = embed(args.pool, "pool", crops, args.dedup_grid)
    names = item_names(args.pool, pool_source)
    n = len(names)
    curated = embed(args.curated, "curated") if args.curated else None
    protected = [(spec, *embed(spec, "protected", crops, args.dedup_grid)) for spec in args.protect]
    times["embed_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    alive = np.ones(n, dtype=bool)
    steps: list[dict] = [{"step": "pool", "spec": args.pool, "images": n}]
    removed: list[tuple[str, str, str, float]] = []  # (path, why, the image it copies, similarity)
    figures: dict[str, str] = {}

    if args.dedup or protected:
        t = time.perf_counter()
        (desc, views), prot_desc, what = dedup_space(pool, [f for _, _, f in protected], args.descriptor)
        if args.dedup:
            groups = cu.duplicate_groups(desc, args.dedup_threshold, views=views)
            dup = np.flatnonzero(groups != np.arange(n))
            sims = pair_similarity(desc, views, dup, groups[dup]).tolist()
            for i, s in zip(dup.tolist(), sims):
                removed.append((names[i], "duplicate", names[groups[i]], s))
            alive[dup] = False
            sizes = np.bincount(groups, minlength=n)
            steps.append({"step": "dedup", "descriptor": what, "threshold": args.dedup_threshold,
                          "groups": int((sizes > 1).sum()), "removed": len(dup), "left": int(alive.sum())})
            figures["dedup"] = draw_groups(pool_source, groups, names, out / "dedup_groups.png")
        threshold = args.protect_threshold if args.protect_threshold is not None else args.dedup_threshold
        for (spec, source, _), (pd, pviews) in zip(protected, prot_desc):
            hit, near, sims = cu.protect(desc, pd, threshold, pool_views=views, protected_views=pviews)
            pnames = item_names(spec, source)
            fresh = [(i, j, s) for i, j, s in zip(hit.tolist(), near.tolist(), sims.tolist()) if alive[i]]
            for i, j, s in fresh:
                removed.append((names[i], f"copy of protected {spec}", pnames[j], s))
                alive[i] = False
            steps.append({"step": "protect", "spec": spec, "images": len(source), "threshold": threshold,
                          "descriptor": what, "removed": len(fresh), "left": int(alive.sum())})
        times["dedup_s"] = time.perf_counter() - t

    index = np.flatnonzero(alive)  # pool indices still in play
    # retrieval and k-means compare [CLS] centred on the pool's mean: the [CLS] of a pool from one domain share a
    # large common part (raw cosines of 0.98-1.00 between unrelated images of a small backbone), which centring
    # removes; a strong backbone on a varied pool has a small mean and is barely changed
    mean = pool["cls"].mean(0)
    feats = pool["cls"] - mean
    if curated is not None:
        t = time.perf_counter()
        cur_source, cur = curated
        queries = cur["cls"] - mean
        if args.per_query is not None:
            picked = cu.retrieve_per_query(queries, feats[index], args.per_query)
            step = {"step": "retrieve", "mode": "per-query", "k": args.per_query, "space": "[CLS], centred"}
            figures["retrieved"] = draw_retrieved(cur_source, queries, pool_source, feats[index], index,
                                                  out / "retrieved.png", args.per_query)
        else:
            k = min(args.clusters, len(index))
            picked, _ = cu.retrieve_clusters(queries, feats[index], k, args.per_cluster, args.seed)
            step = {"step": "retrieve", "mode": "clusters", "clusters": k, "per_cluster": args.per_cluster,
                    "space": "[CLS], centred"}
            figures["retrieved"] = draw_retrieved(cur_source, queries, pool_source, feats[index], index,
                                                  out / "retrieved.png", 4)
        index = index[picked]
        steps.append({**step, "curated": args.curated, "curated_images": len(cur_source), "left": len(index)})
        times["retrieve_s"] = time.perf_counter() - t

    if args.balance is not None and args.balance < len(index):
        t = time.perf_counter()
        levels = args.levels or default_levels(len(index))
        if levels[0] > len(index):
            raise UserError(f"--levels {','.join(map(str, levels))}: {levels[0]} clusters for {len(index)} images")
        # L2, as Vo et al. (spherical k-means gave samples no more even than random ones in the Fashion-MNIST study)
        h = cu.hierarchical_kmeans(feats[index], levels, args.resample_steps, seed=args.seed, metric="l2")
        picked = cu.balanced_sample(h.labels, args.balance, args.seed)
        figures["clusters"] = draw_clusters(pool_source, index, h.point_labels(len(levels)), out / "clusters.png",
                                            args.seed)
        index = index[picked]
        steps.append({"step": "balance", "levels": levels, "resample_steps": args.resample_steps,
                      "target": args.balance, "left": len(index)})
        times["balance_s"] = time.perf_counter() - t
    elif args.balance is not None:
        steps.append({"step": "balance", "target": args.balance, "left": len(index),
                      "note": "target not below the images left: all kept"})

    selected = [names[i] for i in index.tolist()]
    if args.union:
        selected += item_names(args.curated, curated[0])
        steps.append({"step": "union", "curated": args.curated, "left": len(selected)})
    (out / "selected.txt").write_text("".join(f"{s}\n" for s in selected))
    (out / "removed.tsv").write_text("path\twhy\tcopy_of\tsimilarity\n" + "".join(
        f"{p}\t{w}\t{c}\t{s:.4f}\n" for p, w, c, s in removed))
    shards = None
    if args.shards:
        t = time.perf_counter()
        parts = [(pool_source, index.tolist())] + ([(curated[0], list(range(len(curated[0]))))] if args.union else [])
        shards = write_shards(parts, Path(args.shards), args.shard_size, args.seed)
        times["shards_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    summary = {"checkpoint": str(args.checkpoint), "pool": args.pool, "selected": len(selected), "steps": steps,
               "figures": {k: v for k, v in figures.items() if v}, "shards": shards,
               "seconds": {k: round(v, 3) for k, v in times.items()}}
    (out / "curation.json").write_text(json.dumps(summary, indent=2) + "\n")
    counts = " -> ".join(f"{s['step']} {s.get('left', s.get('images'))}" for s in steps)
    print(f"curate {args.pool}: {counts}; {len(selected)} selected -> {out / 'selected.txt'}")
    if shards:
        print(f"train with: --data '{shards['spec']}'")
    if args.json:
        print_json(summary)
    return 0


def _thumb(source, i: int) -> np.ndarray:
    return to_uint8(source[i][0]).permute(1, 2, 0).numpy()


def draw_groups(source, groups: np.ndarray, names: list[str], path: Path, rows: int = 8,
                cols: int = 6) -> str | None:
    """The largest duplicate groups, one a row: the kept image first, then removed ones."""
    sizes = np.bincount(groups, minlength=len(groups))
    big = [g for g in np.argsort(-sizes, kind="stable")[:rows].tolist() if sizes[g] > 1]
    if not big:
        return None
    table = []
    for g in big:
        members = np.flatnonzero(groups == g)[:cols].tolist()
        table.append([(_thumb(source, i), ("kept " if i == g else "removed ") + Path(names[i]).name[:14])
                      for i in members])
    grid(table, path, f"duplicate groups ({int((sizes > 1).sum())} in all; largest shown)")
    return path.name


def draw_retrieved(cur_source, cur: torch.Tensor, pool_source, pool: torch.Tensor, index: np.ndarray, path: Path,
                   k: int, rows: int = 8) -> str:
    """Curated images (left) beside their nearest pool images."""
    queries = np.unique(np.linspace(0, len(cur) - 1, min(rows, len(cur))).round().astype(int)).tolist()
    sims, nbr = cu.knn(cur[queries], pool, min(k, 6))
    table = []
    for r, q in enumerate(queries):
        row = [(_thumb(cur_source, q), f"query {q}")]
        row += [(_thumb(pool_source, int(index[j])), f"{s:.2f}") for s, j in zip(sims[r].tolist(), nbr[r].tolist())]
        table.append(row)
    grid(table, path, "curated images (left) and their nearest pool images (cosine)")
    return path.name


def draw_clusters(source, index: np.ndarray, labels: np.ndarray, path: Path, seed: int, rows: int = 10,
                  cols: int = 8) -> str:
    """Random members of the top-level clusters, one cluster a row."""
    rng = np.random.default_rng(seed)
    sizes = np.bincount(labels)
    table = []
    for c in np.argsort(-sizes, kind="stable")[:rows].tolist():
        members = np.flatnonzero(labels == c)
        pick = rng.choice(members, min(cols, len(members)), replace=False)
        table.append([(_thumb(source, int(index[i])), f"c{c} ({sizes[c]})") for i in pick])
    grid(table, path, f"top-level clusters ({len(sizes)}), random members")
    return path.name
