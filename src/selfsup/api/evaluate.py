"""`selfsup.evaluate(checkpoint, protocol, data, **options)`: frozen-feature evaluation of any backbone
`selfsup.load` accepts; `selfsup eval PROTOCOL` calls it.

Every protocol reads cached features (eval/cache.py), records its result in the run folder
(`eval/<protocol>-<data>.json`, for `selfsup report`; the dense ones with a picture beside it) and returns it, with
the lines the command prints under "text"."""
from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.device import resolve_device
from ..core.errors import UserError
from ..core.io import atomic_write
from ..data.dense import IGNORE, open_depth, open_segmentation, open_video
from ..data.scenes import SceneSet, SceneVideos
from ..eval.attention_masks import attention_jaccard
from ..eval.cache import FeatureCache, cache_folder, run_folder, slug
from ..eval.cluster import kmeans_scores
from ..eval.copydetect import copy_detection
from ..eval.dense_features import dense_features, video_features
from ..eval.depth import linear_depth
from ..eval.features import available, select
from ..eval.knn import knn_accuracy
from ..eval.linear import LEARNING_RATES, linear_probe
from ..eval.lowshot import lowshot
from ..eval.retrieval import retrieval_scores
from ..eval.run import frozen_features
from ..eval.segment import linear_segmentation, segmentation_input
from ..viz.dense import attention_mask_figure, depth_figure, save_masks, segmentation_figure, video_figure, video_rows
from ..weights import Loaded, load

log = logging.getLogger("selfsup")

MASKS = "scenes | a VOC or ADE20K folder (JPEGImages/ + SegmentationClass/, or images/ + annotations/)"


@dataclass
class Target:
    """What is evaluated, and how its features are computed."""

    checkpoint: str
    data: str
    device: str = "auto"
    random_init: bool = False  # the same architecture untrained: the baseline
    cache: bool = True  # features cached in the run folder (or beside the checkpoint)
    size: int | None = None  # dense protocols: the input size; None: the backbone's

    def loaded(self, rgb: str | None = None) -> tuple[Loaded, torch.device]:
        """The backbone and the device; `rgb` names what reads 8-bit RGB images only (a dense protocol, a figure),
        for which a backbone of another channel count is one error line."""
        loaded = load(self.checkpoint)
        n = loaded.config.in_chans
        if rgb is not None and n != 3:
            raise UserError(f"{rgb}: {self.checkpoint} takes {n} channel(s) (backbone.in_chans={n}), but {rgb} reads "
                            "8-bit RGB images (knn, linear, lowshot, cluster, retrieval and embed read any channel "
                            "count)")
        if self.random_init:
            loaded.backbone = loaded.random_init(seed=0)
        return loaded, resolve_device(self.device)

    def feature_cache(self) -> FeatureCache:
        return FeatureCache(cache_folder(self.checkpoint) if self.cache else None, self.checkpoint,
                            "random-init" if self.random_init else "trained")

    def what(self, loaded: Loaded) -> str:
        return "random init" if self.random_init else loaded.source

    def name(self, protocol: str) -> str:
        """The stem of a protocol's record and picture: <protocol>-<data>[-random-init]."""
        return f"{protocol}-{slug(self.data)}{'-random-init' if self.random_init else ''}"

    def figure(self, protocol: str) -> Path | None:
        """Where a protocol's picture goes: beside its JSON in the run folder, else in ./selfsup-eval."""
        run = run_folder(self.checkpoint)
        folder = run / "eval" if run is not None else Path("selfsup-eval")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        return folder / f"{self.name(protocol)}.png"


# ----- image-level protocols, on [CLS] (and pooled) features -----

def _frozen(t: Target):
    loaded, device = t.loaded()
    f = frozen_features(loaded, t.data, device, t.feature_cache())
    return f, f"{t.what(loaded)} on {t.data} ({len(f.train_labels)} train, {len(f.test_labels)} test)", device


def knn(t: Target, features: str = "cls", k: Sequence[int] = (20,), temperature: float = 0.07) -> dict:
    ks = list(k)
    if not ks or min(ks) < 1:
        raise UserError(f"knn: k {ks}: every value must be at least 1")
    f, what, _ = _frozen(t)
    table = knn_accuracy(select(f.train, features), f.train_labels, select(f.test, features), f.test_labels, ks,
                         temperature)
    text = [f"weighted k-NN (T={temperature}, {features}) of {what}:"]
    text += [f"  k={n:<4} top-1 {r['top1']:6.2f} %   top-5 {r['top5']:6.2f} %" for n, r in table.items()]
    result = dict(table[ks[0]]) if len(ks) == 1 else {}
    return {"features": features, **result, "k": {str(n): v for n, v in table.items()}, "text": text}


def linear(t: Target, features: str = "all", epochs: int = 30, batch_size: int = 256,
           lrs: Sequence[float] | None = None, val_fraction: float = 0.1) -> dict:
    f, what, device = _frozen(t)
    kinds = available(f.train) if features == "all" else features.split(",")
    lrs = list(lrs) if lrs is not None else list(LEARNING_RATES)
    r = linear_probe({k: select(f.train, k) for k in kinds}, f.train_labels, {k: select(f.test, k) for k in kinds},
                     f.test_labels, len(f.classes), lrs, epochs, batch_size, val_fraction, device=device)
    text = [f"linear probe ({len(lrs)} learning rates x {len(kinds)} feature kinds, {epochs} epochs) of {what}:",
            f"  {'features':<16}{'lr':>9}{'val top-1':>11}{'test top-1':>12}{'top-5':>9}"]
    for kind, v in r["kinds"].items():
        mark = "  <- chosen on val" if kind == r["best"] else ""
        text.append(f"  {kind:<16}{v['lr']:>9.0e}{v['val_top1']:>10.2f}%{v['top1']:>11.2f}%{v['top5']:>8.2f}%{mark}")
    return {"features": features, "epochs": epochs, "lrs": lrs, **r, "text": text}


def low_shot(t: Target, features: str = "cls", fractions: Sequence[float] = (0.01, 0.1), seeds: int = 3,
             lambd: float = 1e-4) -> dict:
    if any(not 0 < fr <= 1 for fr in fractions) or seeds < 1 or lambd <= 0:
        raise UserError("lowshot: fractions must lie in (0, 1], seeds >= 1 and lambd > 0")
    f, what, _ = _frozen(t)
    r = lowshot(select(f.train, features), f.train_labels, select(f.test, features), f.test_labels, list(fractions),
                tuple(range(seeds)), lambd)
    text = [f"low-shot logistic regression (lambda={lambd}, {seeds} seeds, {features}) of {what}:"]
    text += [f"  {name:>4} of the labels ({v['n_labels']:>5} images)  top-1 {v['mean']:6.2f} +/- {v['std']:.2f} %"
             for name, v in r.items()]
    return {"features": features, "lambd": lambd, "fractions": r, "text": text}


def cluster(t: Target, features: str = "cls", seed: int = 0) -> dict:
    f, what, _ = _frozen(t)
    r = kmeans_scores(select(f.test, features), f.test_labels, len(f.classes), seed)
    text = [f"k-means (k={len(f.classes)}) on the test features ({features}) of {what}:",
            "  " + "   ".join(f"{name.upper()} {v:6.2f} %" for name, v in r.items())]
    return {"features": features, **r, "text": text}


def retrieval(t: Target, features: str = "cls") -> dict:
    f, what, _ = _frozen(t)
    r = retrieval_scores(select(f.train, features), f.train_labels, select(f.test, features), f.test_labels)
    text = [f"retrieval (test queries the train set by cosine, {features}) of {what}:",
            "  " + "   ".join(f"{name} {v:6.2f} %" for name, v in r.items())]
    return {"features": features, **r, "text": text}


# ----- dense protocols, on patch tokens and attention -----

def open_dense(spec: str, split: str, need: str):
    """A dense set: `scenes`, or a folder in a segmentation or depth layout; `need` is 'mask' or 'depth'."""
    if spec == "scenes":
        return SceneSet(split)
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"--data {spec}: expected 'scenes' or a folder ({MASKS if need == 'mask' else 'depth pairs'})")
    return open_segmentation(root, split) if need == "mask" else open_depth(root, split)


def _dense(t: Target, protocol: str):
    loaded, device = t.loaded(rgb=f"eval {protocol}")
    return loaded, device, t.feature_cache(), t.size or loaded.image_size, t.what(loaded)


def attention_masks(t: Target, mass: float = 0.6) -> dict:
    if not 0 < mass < 1:
        raise UserError(f"--mass {mass}: expected a share between 0 and 1")
    loaded, device, cache, size, what = _dense(t, "attention-masks")
    test = open_dense(t.data, "test", "mask")
    f = dense_features(loaded.backbone, test, t.data, "test", size, 1, loaded.mean, loaded.std, device, cache)
    fg, valid = (f.mask != 0) & (f.mask != IGNORE), f.mask != IGNORE
    r = attention_jaccard(f.attn, fg, valid, mass)
    text = [f"[CLS] attention masks ({mass:.0%} of the mass, {f.attn.shape[1]} heads) of {what} on {t.data} "
            f"({r['images']} test images):",
            f"  Jaccard with the objects: best head {r['jaccard_best']:.2f} % (head {r['best_head']}), "
            f"mean over heads {r['jaccard_mean']:.2f} %",
            "  per head: " + "  ".join(f"{j:.1f}" for j in r["per_head"]),
            "  share of the attention on the objects: " + "  ".join(f"{m:.1f}" for m in r["object_mass"]) +
            f" % per head (the objects cover {r['object_area']:.1f} % of the pixels)"]
    png = t.figure("attention-masks")
    if png is not None:
        attention_mask_figure(test, f, r["best_head"], mass, size, png)
        r["png"] = str(png)
    return {"mass": mass, "size": size, **r, "text": text}


def _probe_input(f, layers: int) -> torch.Tensor:
    return segmentation_input(f.patch[:, -layers:], f.cls[:, -layers:])


def _dense_splits(t: Target, need: str, layers: int, protocol: str):
    loaded, device, cache, size, what = _dense(t, protocol)
    sets = {s: open_dense(t.data, s, need) for s in ("train", "test")}
    if need == "depth" and not sets["train"].has_depth:
        raise UserError(f"--data {t.data}: no depth maps (expected 'scenes' or a depth folder)")
    f = {s: dense_features(loaded.backbone, src, t.data, s, size, layers, loaded.mean, loaded.std, device, cache)
         for s, src in sets.items()}
    return sets, f, device, size, what


def segment(t: Target, layers: int = 1, epochs: int = 30) -> dict:
    if layers not in (1, 4):
        raise UserError(f"--layers {layers}: expected 1 or 4")
    sets, f, device, size, what = _dense_splits(t, "mask", layers, "segment")
    classes = sets["train"].classes
    r = linear_segmentation(_probe_input(f["train"], layers), f["train"].mask, _probe_input(f["test"], layers),
                            f["test"].mask, len(classes), epochs=epochs, device=device)
    pred = r.pop("pred")
    text = [f"linear segmentation (last {layers} block(s) + [CLS], {len(classes)} classes) of {what} on {t.data} "
            f"({len(sets['train'])} train, {len(sets['test'])} test images):",
            f"  mIoU {r['miou']:.2f} %   pixel accuracy {r['pixel_acc']:.2f} %",
            "  IoU per class: " + "  ".join(f"{c} {v:.1f}" for c, v in zip(classes, r["iou"]) if v == v)]
    png = t.figure("segment")
    if png is not None:
        segmentation_figure(f["test"], pred, sets["test"], size, png)
        r["png"] = str(png)
    return {"layers": layers, "size": size, "classes": classes, **r, "text": text}


def depth(t: Target, layers: int = 1, epochs: int = 10) -> dict:
    if layers not in (1, 4):
        raise UserError(f"--layers {layers}: expected 1 or 4")
    sets, f, device, size, what = _dense_splits(t, "depth", layers, "depth")
    max_depth = sets["train"].max_depth
    r = linear_depth(_probe_input(f["train"], layers), f["train"].depth, _probe_input(f["test"], layers),
                     f["test"].depth, min_depth=1e-3, max_depth=max_depth, epochs=epochs, device=device)
    pred = r.pop("pred")
    text = [f"linear depth (last {layers} block(s) + [CLS], 256 bins to {max_depth:g} m) of {what} on {t.data} "
            f"({len(sets['train'])} train, {len(sets['test'])} test images):",
            f"  RMSE {r['rmse']:.3f} m   abs rel {r['abs_rel']:.3f}   delta<1.25 {100 * r['delta1']:.1f} %   "
            f"(the train mean everywhere: RMSE {r['mean_baseline']:.3f} m)"]
    png = t.figure("depth")
    if png is not None:
        depth_figure(f["test"], pred, sets["test"], size, png)
        r["png"] = str(png)
    return {"layers": layers, "size": size, "max_depth": max_depth, **r, "text": text}


def open_videos(spec: str):
    if spec == "scenes-video":
        return SceneVideos()
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"--data {spec}: expected 'scenes-video' or a DAVIS 2017 folder")
    return open_video(root, "val")


def video(t: Target, n_last: int = 7, topk: int = 5, radius: int = 12) -> dict:
    from ..eval.video import j_and_f, labels_to_patches, propagate, summarise, upsample_labels  # scipy: start-up
    if n_last < 0 or topk < 1 or radius < 1:
        raise UserError("video: --n-last must be >= 0, --topk and --radius >= 1")
    loaded, device, cache, _, what = _dense(t, "video")  # the size: video_features' own default, not _dense's
    videos = open_videos(t.data)
    seqs, size = video_features(loaded.backbone, videos, t.data, t.size, loaded.mean, loaded.std, device, cache,
                                least=loaded.image_size)
    patch = loaded.backbone.patch_size
    png = t.figure("video")
    out_dir = png.with_suffix("") if png is not None else None
    per_seq, shown = [], []
    for s in seqs:  # one sequence's masks at a time, uint8 at the frames' own size (DAVIS val: 2,000 frames)
        masks = [s.sequence.mask(t) for t in range(len(s.sequence))]
        if masks[0] is None:
            raise UserError(f"{videos.name}/{s.name}: the first frame has no annotation to propagate")
        n_objects = int(masks[0].max())
        first = labels_to_patches(masks[0], n_objects, patch, grid=tuple(s.patch.shape[1:3]))
        soft = propagate(list(s.patch), first, n_last, topk, radius)
        preds = [masks[0]] + [upsample_labels(p, tuple(masks[0].shape), patch).to(torch.uint8) for p in soft[1:]]
        scored = [i for i, m in enumerate(masks) if m is not None]  # frames with a ground truth
        if len(scored) < 3:  # DAVIS scores neither the first nor the last frame
            log.warning("%s: %d annotated frame(s), fewer than 3: not scored", s.name, len(scored))
            continue
        per_seq.append({"sequence": s.name, **j_and_f([preds[i] for i in scored], [masks[i] for i in scored],
                                                      n_objects)})
        if out_dir is not None:
            save_masks(preds, out_dir / s.name)
        if len(shown) < 3:
            shown.append(video_rows(s.sequence, masks, preds))
    if not per_seq:
        raise UserError(f"--data {t.data}: no sequence has 3 annotated frames to score (DAVIS skips the first "
                        "and the last)")
    total = summarise(per_seq)
    text = [f"video label propagation (top-{topk}, {n_last} previous frames, radius {radius}) of {what} on "
            f"{t.data} ({len(seqs)} sequences):", f"  J&F {total['jf']:.2f} %   J {total['j']:.2f} %   F {total['f']:.2f} %"]
    if png is not None:
        video_figure(shown, png)
        total.update(png=str(png), masks=str(out_dir))
    return {"size": size, "n_last": n_last, "topk": topk, "radius": radius, **total, "sequences": per_seq,
            "text": text}


def copydetect(t: Target, queries: int = 200, seed: int = 0) -> dict:
    if queries < 1:
        raise UserError("copydetect: --queries must be at least 1")
    loaded, device, cache, size, what = _dense(t, "copydetect")
    r = copy_detection(loaded, t.data, size, queries, seed, device, cache)
    text = [f"copy detection ([CLS] + GeM patch descriptor, whitened) of {what} on {t.data}: {r['queries']} "
            f"distorted copies among {r['database']} images:", f"  mAP {r['map']:.2f} %   recall@1 {r['recall1']:.2f} %"]
    return {"size": size, "seed": seed, **r, "text": text}


PROTOCOLS: dict[str, Callable[..., dict]] = {
    "knn": knn, "linear": linear, "lowshot": low_shot, "cluster": cluster, "retrieval": retrieval,
    "attention-masks": attention_masks, "segment": segment, "depth": depth, "video": video, "copydetect": copydetect,
}
DENSE = ("attention-masks", "segment", "depth", "video", "copydetect")  # they take `size`
DEFAULT_DATA = {"video": "scenes-video", **{p: "scenes" for p in DENSE if p != "video"}}


def evaluate(checkpoint: str | Path, protocol: str, data: str | None = None, *, device: str = "auto",
             random_init: bool = False, cache: bool = True, size: int | None = None, **options) -> dict:
    """Evaluate the frozen backbone of `checkpoint` (anything `selfsup.load` reads) by `protocol` (knn, linear,
    lowshot, cluster, retrieval, attention-masks, segment, depth, video, copydetect) on `data` (default mnist5k,
    scenes for the dense ones, scenes-video for video). `options` are the protocol's own (as its command's flags:
    k, temperature, features, epochs, layers, mass, ...). The result is recorded in the run folder and
    returned; its "text" holds what `selfsup eval` prints."""
    if protocol not in PROTOCOLS:
        raise UserError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if size is not None and protocol not in DENSE:
        raise UserError(f"{protocol}: size applies to the dense protocols ({', '.join(DENSE)}) only")
    known = list(inspect.signature(PROTOCOLS[protocol]).parameters)[1:]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"{protocol}: no option {unknown[0]!r} (expected {', '.join(known) or 'none'})")
    t = Target(str(checkpoint), data or DEFAULT_DATA.get(protocol, "mnist5k"), device, random_init, cache, size)
    result = PROTOCOLS[protocol](t, **options)
    result = {"protocol": protocol, "checkpoint": t.checkpoint, "data": t.data, "random_init": random_init, **result}
    _record(t, protocol, {k: v for k, v in result.items() if k != "text"})
    return result


def _record(t: Target, protocol: str, result: dict) -> None:
    """The result as eval/<protocol>-<data>.json in the run folder, for `selfsup report`."""
    run = run_folder(t.checkpoint)
    if run is None:
        return
    out = run / "eval" / f"{t.name(protocol)}.json"
    try:
        out.parent.mkdir(exist_ok=True)
        atomic_write(out, json.dumps(result, indent=2))
    except OSError:
        pass  # a read-only run folder: the result is still returned
