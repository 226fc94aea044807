"""`selfsup eval attention-masks|segment|depth|video|copydetect`: what DINO is known for, measured.

Each reads cached patch features (eval/dense_features.py), prints its figure beside what it means, records the
result in the run folder (`eval/<protocol>-<data>.json`) with a picture (`eval/<protocol>-<data>.png`), and with
--json ends with one JSON line whose headline keys are jaccard_best, miou, rmse, jf and map."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..core.errors import UserError
from ..data.dense import IGNORE, open_depth, open_segmentation, open_video
from ..data.scenes import SceneSet, SceneVideos
from ..eval.attention_masks import attention_jaccard
from ..eval.cache import FeatureCache, cache_folder, run_folder, slug
from ..eval.copydetect import copy_detection
from ..eval.dense_features import dense_features, video_features
from ..eval.depth import linear_depth
from ..eval.segment import linear_segmentation, segmentation_input
from ..viz.dense import (
    attention_mask_figure,
    depth_figure,
    save_masks,
    segmentation_figure,
    video_figure,
)
from .shared import finish, loaded_backbone

log = logging.getLogger("selfsup")


def dense_common(p: argparse.ArgumentParser, data: str, what: str) -> None:
    p.add_argument("--checkpoint", required=True, help="a run folder, a checkpoint, a safetensors export")
    p.add_argument("--data", default=data, help=f"{what} (default: {data})")
    p.add_argument("--size", type=int, help="images are resized (shorter side) and centre-cropped to this many "
                   "pixels, a multiple of the patch (default: the backbone's training size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--random-init", action="store_true", help="evaluate the same architecture untrained (a baseline)")
    p.add_argument("--no-cache", action="store_true", help="compute the features afresh and do not store them")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")


MASKS = "scenes | a VOC or ADE20K folder (JPEGImages/ + SegmentationClass/, or images/ + annotations/)"


def register(protocols) -> None:
    att = protocols.add_parser(
        "attention-masks", help="Jaccard of each head's 60 %% [CLS] attention mask with the object masks",
        description="DINO Fig. 4: per head of the last block, the smallest set of patches holding 60 % of the [CLS] "
        "attention, upsampled (nearest) and compared with the ground-truth foreground (every non-background "
        "class) by the Jaccard index, averaged over the test images. Reports the best head and the mean over heads.")
    dense_common(att, "scenes", MASKS)
    att.add_argument("--mass", type=float, default=0.6, help="share of each head's attention its mask keeps")
    att.set_defaults(run=run_attention_masks)

    seg = protocols.add_parser(
        "segment", help="linear segmentation probe on frozen patch tokens: mIoU",
        description="DINOv2's linear segmentation ('lin.', Table 10): BatchNorm + a 1x1 convolution on the frozen "
        "patch tokens with the [CLS] token concatenated, logits upsampled bilinearly to the labels; --layers 4 "
        "concatenates the last 4 blocks (the '+ms' features). Trained on train, mIoU on test.")
    dense_common(seg, "scenes", MASKS)
    seg.add_argument("--layers", type=int, default=1, choices=(1, 4), help="last blocks whose tokens are used")
    seg.add_argument("--epochs", type=int, default=30, help="passes over the cached training features (DINOv2's "
                     "AdamW, lr 1e-3, poly schedule, batch 16)")
    seg.set_defaults(run=run_segment)

    depth = protocols.add_parser(
        "depth", help="linear depth probe on frozen patch tokens: RMSE",
        description="DINOv2's linear depth probe (Table 11, 'lin. 1'): the patch tokens with the [CLS] token "
        "concatenated, a 1x1 convolution classifying into 256 depth bins; the depth is the bins' centres weighted by "
        "the normalised scores. Trained on train, RMSE (metres) on test, beside a constant guess.")
    dense_common(depth, "scenes", "scenes | a depth folder (train/ and test/ with <name>.png + <name>_depth.png, "
                 "16-bit millimetres)")
    depth.add_argument("--layers", type=int, default=1, choices=(1, 4), help="last blocks whose tokens are used")
    depth.add_argument("--epochs", type=int, default=10, help="passes over the cached training features (DINOv2's "
                       "AdamW, lr 5e-3, SigLoss + 0.5 gradient loss, batch 16)")
    depth.set_defaults(run=run_depth)

    video = protocols.add_parser(
        "video", help="DAVIS-style label propagation through video by patch-feature k-NN: J&F",
        description="DINO's video object segmentation (Table 5; Jabri et al.'s protocol): the first frame's mask "
        "is propagated frame by frame, each patch taking the labels of its top-k most similar patches of the first "
        "frame and the last n frames, within a local neighbourhood. Reports the DAVIS J&F mean and writes the "
        "propagated masks.")
    dense_common(video, "scenes-video", "scenes-video | a DAVIS 2017 folder (JPEGImages/480p/<seq>/, "
                 "Annotations/480p/<seq>/)")
    video.add_argument("--n-last", type=int, default=7, help="previous frames in the queue (besides the first)")
    video.add_argument("--topk", type=int, default=5, help="neighbours each patch takes its labels from")
    video.add_argument("--radius", type=int, default=12, help="size of the local neighbourhood in patches")
    video.set_defaults(run=run_video)

    copy = protocols.add_parser(
        "copydetect", help="find strongly distorted copies among distractors: mAP",
        description="DINO's copy detection (Table 4, Copydays 'strong'): queries are distorted copies (crops, "
        "rotations, blur, JPEG, colour, pasted text and patches, print-and-scan noise) of database images, which "
        "are mixed with distractors; the descriptor is [CLS] + GeM-pooled patch tokens, whitened on the train "
        "split. Reports mAP and recall@1.")
    dense_common(copy, "scenes", "any images: a built-in set or a folder (the test split is the database, the "
                 "train split the whitening set)")
    copy.add_argument("--queries", type=int, default=200, help="database images that get a distorted copy")
    copy.add_argument("--seed", type=int, default=0, help="seed of the distortions")
    copy.set_defaults(run=run_copydetect)


def setup(args: argparse.Namespace):
    """(loaded backbone, device, cache, input size, what is evaluated)."""
    loaded, device = loaded_backbone(args)
    size = args.size or loaded.image_size
    cache = FeatureCache(None if args.no_cache else cache_folder(args.checkpoint), args.checkpoint,
                         "random-init" if args.random_init else "trained")
    return loaded, device, cache, size, "random init" if args.random_init else loaded.source


def open_dense(spec: str, split: str, need: str):
    """A dense set: `scenes`, or a folder in a segmentation or depth layout; `need` is 'mask' or 'depth'."""
    if spec == "scenes":
        return SceneSet(split)
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"--data {spec}: expected 'scenes' or a folder ({MASKS if need == 'mask' else 'depth pairs'})")
    return open_segmentation(root, split) if need == "mask" else open_depth(root, split)


def figure_path(args: argparse.Namespace, protocol: str) -> Path | None:
    """Where a protocol's picture goes: beside its JSON in the run folder, else in ./selfsup-eval."""
    run = run_folder(args.checkpoint)
    folder = run / "eval" if run is not None else Path("selfsup-eval")
    name = f"{protocol}-{slug(args.data)}{'-random-init' if args.random_init else ''}.png"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder / name


def run_attention_masks(args: argparse.Namespace) -> int:
    if not 0 < args.mass < 1:
        raise UserError(f"--mass {args.mass}: expected a share between 0 and 1")
    loaded, device, cache, size, what = setup(args)
    test = open_dense(args.data, "test", "mask")
    f = dense_features(loaded.backbone, test, args.data, "test", size, 1, loaded.mean, loaded.std, device, cache)
    fg, valid = (f.mask != 0) & (f.mask != IGNORE), f.mask != IGNORE
    r = attention_jaccard(f.attn, fg, valid, args.mass)
    print(f"[CLS] attention masks ({args.mass:.0%} of the mass, {f.attn.shape[1]} heads) of {what} on "
          f"{args.data} ({r['images']} test images):")
    print(f"  Jaccard with the objects: best head {r['jaccard_best']:.2f} % (head {r['best_head']}), "
          f"mean over heads {r['jaccard_mean']:.2f} %")
    print("  per head: " + "  ".join(f"{j:.1f}" for j in r["per_head"]))
    print("  share of the attention on the objects: " + "  ".join(f"{m:.1f}" for m in r["object_mass"]) +
          f" % per head (the objects cover {r['object_area']:.1f} % of the pixels)")
    png = figure_path(args, "attention-masks")
    if png is not None:
        attention_mask_figure(test, f, r["best_head"], args.mass, size, png)
        r["png"] = str(png)
    return finish(args, "attention-masks", {"mass": args.mass, "size": size, **r})


def probe_input(f, layers: int) -> torch.Tensor:
    return segmentation_input(f.patch[:, -layers:], f.cls[:, -layers:])


def run_segment(args: argparse.Namespace) -> int:
    loaded, device, cache, size, what = setup(args)
    sets = {s: open_dense(args.data, s, "mask") for s in ("train", "test")}
    f = {s: dense_features(loaded.backbone, src, args.data, s, size, args.layers, loaded.mean, loaded.std, device,
                           cache) for s, src in sets.items()}
    classes = sets["train"].classes
    r = linear_segmentation(probe_input(f["train"], args.layers), f["train"].mask, probe_input(f["test"], args.layers),
                            f["test"].mask, len(classes), epochs=args.epochs, device=device)
    pred = r.pop("pred")
    print(f"linear segmentation (last {args.layers} block(s) + [CLS], {len(classes)} classes) of {what} on "
          f"{args.data} ({len(sets['train'])} train, {len(sets['test'])} test images):")
    print(f"  mIoU {r['miou']:.2f} %   pixel accuracy {r['pixel_acc']:.2f} %")
    print("  IoU per class: " + "  ".join(f"{c} {v:.1f}" for c, v in zip(classes, r["iou"]) if v == v))
    png = figure_path(args, "segment")
    if png is not None:
        segmentation_figure(f["test"], pred, sets["test"], size, png)
        r["png"] = str(png)
    return finish(args, "segment", {"layers": args.layers, "size": size, "classes": classes, **r})


def run_depth(args: argparse.Namespace) -> int:
    loaded, device, cache, size, what = setup(args)
    sets = {s: open_dense(args.data, s, "depth") for s in ("train", "test")}
    if not sets["train"].has_depth:
        raise UserError(f"--data {args.data}: no depth maps (expected 'scenes' or a depth folder)")
    f = {s: dense_features(loaded.backbone, src, args.data, s, size, args.layers, loaded.mean, loaded.std, device,
                           cache) for s, src in sets.items()}
    max_depth = sets["train"].max_depth
    r = linear_depth(probe_input(f["train"], args.layers), f["train"].depth, probe_input(f["test"], args.layers),
                     f["test"].depth, min_depth=1e-3, max_depth=max_depth, epochs=args.epochs, device=device)
    pred = r.pop("pred")
    print(f"linear depth (last {args.layers} block(s) + [CLS], 256 bins to {max_depth:g} m) of {what} on "
          f"{args.data} ({len(sets['train'])} train, {len(sets['test'])} test images):")
    print(f"  RMSE {r['rmse']:.3f} m   abs rel {r['abs_rel']:.3f}   delta<1.25 {100 * r['delta1']:.1f} %   "
          f"(the train mean everywhere: RMSE {r['mean_baseline']:.3f} m)")
    png = figure_path(args, "depth")
    if png is not None:
        depth_figure(f["test"], pred, sets["test"], size, png)
        r["png"] = str(png)
    return finish(args, "depth", {"layers": args.layers, "size": size, "max_depth": max_depth, **r})


def open_videos(spec: str):
    if spec == "scenes-video":
        return SceneVideos()
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"--data {spec}: expected 'scenes-video' or a DAVIS 2017 folder")
    return open_video(root, "val")


def run_video(args: argparse.Namespace) -> int:
    from ..eval.video import (  # scipy: start-up
        j_and_f,
        labels_to_patches,
        propagate,
        summarise,
        upsample_labels,
    )
    if args.n_last < 0 or args.topk < 1 or args.radius < 1:
        raise UserError("video: --n-last must be >= 0, --topk and --radius >= 1")
    loaded, device, cache, size, what = setup(args)
    videos = open_videos(args.data)
    seqs = video_features(loaded.backbone, videos, args.data, size, loaded.mean, loaded.std, device, cache)
    patch = loaded.backbone.patch_size
    png = figure_path(args, "video")
    out_dir = png.with_suffix("") if png is not None else None
    per_seq, shown = [], []
    for s in seqs:
        if s.masks[0] is None:
            raise UserError(f"{videos.name}/{s.name}: the first frame has no annotation to propagate")
        n_objects = int(s.masks[0].max())
        soft = propagate(list(s.patch), labels_to_patches(s.masks[0], n_objects, patch), args.n_last, args.topk,
                         args.radius)
        preds = [s.masks[0]] + [upsample_labels(p, (size, size), patch) for p in soft[1:]]
        scored = [t for t, m in enumerate(s.masks) if m is not None]  # frames with a ground truth
        if len(scored) < 3:  # DAVIS scores neither the first nor the last frame
            log.warning("%s: %d annotated frame(s), fewer than 3: not scored", s.name, len(scored))
            continue
        r = j_and_f([preds[t] for t in scored], [s.masks[t] for t in scored], n_objects)
        per_seq.append({"sequence": s.name, **r})
        if out_dir is not None:
            save_masks(preds, out_dir / s.name)
        if len(shown) < 3:
            shown.append((s, preds))
    if not per_seq:
        raise UserError(f"--data {args.data}: no sequence has 3 annotated frames to score (DAVIS skips the first "
                        "and the last)")
    total = summarise(per_seq)
    print(f"video label propagation (top-{args.topk}, {args.n_last} previous frames, radius {args.radius}) of "
          f"{what} on {args.data} ({len(seqs)} sequences):")
    print(f"  J&F {total['jf']:.2f} %   J {total['j']:.2f} %   F {total['f']:.2f} %")
    if png is not None:
        video_figure(shown, png)
        total.update(png=str(png), masks=str(out_dir))
    return finish(args, "video", {"size": size, "n_last": args.n_last, "topk": args.topk, "radius": args.radius,
                                  **total, "sequences": per_seq})


def run_copydetect(args: argparse.Namespace) -> int:
    if args.queries < 1:
        raise UserError("copydetect: --queries must be at least 1")
    loaded, device, cache, size, what = setup(args)
    r = copy_detection(loaded, args.data, size, args.queries, args.seed, device, cache)
    print(f"copy detection ([CLS] + GeM patch descriptor, whitened) of {what} on {args.data}: {r['queries']} "
          f"distorted copies among {r['database']} images:")
    print(f"  mAP {r['map']:.2f} %   recall@1 {r['recall1']:.2f} %")
    return finish(args, "copydetect", {"size": size, "seed": args.seed, **r})
