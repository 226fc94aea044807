"""`selfsup eval attention-masks|segment|depth|video|copydetect`: what DINO is known for, measured (the flags of
`selfsup.evaluate`'s dense protocols, api/evaluate.py). Each records its result in the run folder
(`eval/<protocol>-<data>.json`) with a picture (`eval/<protocol>-<data>.png`); with --json the last line is one
JSON object whose headline keys are jaccard_best, miou, rmse, jf and map."""
from __future__ import annotations

import argparse

from ..api.evaluate import MASKS


SIZE = ("images are resized (shorter side) and centre-cropped to this many pixels, a multiple of the patch "
        "(default: the backbone's training size)")


def dense_common(p: argparse.ArgumentParser, data: str, what: str, size: str = SIZE) -> None:
    p.add_argument("--checkpoint", required=True, help="a run folder, a checkpoint, a safetensors export")
    p.add_argument("--data", default=data, help=f"{what} (default: {data})")
    p.add_argument("--size", type=int, help=size)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--random-init", action="store_true", help="evaluate the same architecture untrained (a baseline)")
    p.add_argument("--no-cache", action="store_true", help="compute the features afresh and do not store them")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")


def register(protocols, run) -> None:
    att = protocols.add_parser(
        "attention-masks", help="Jaccard of each head's 60 %% [CLS] attention mask with the object masks",
        description="DINO Fig. 4: per head of the last block, the smallest set of patches holding 60 % of the [CLS] "
        "attention, upsampled (nearest) and compared with the ground-truth foreground (every non-background "
        "class) by the Jaccard index, averaged over the test images. Reports the best head and the mean over heads.")
    dense_common(att, "scenes", MASKS)
    att.add_argument("--mass", type=float, default=0.6, help="share of each head's attention its mask keeps")
    att.set_defaults(run=run)

    seg = protocols.add_parser(
        "segment", help="linear segmentation probe on frozen patch tokens: mIoU",
        description="DINOv2's linear segmentation ('lin.', Table 10): BatchNorm + a 1x1 convolution on the frozen "
        "patch tokens with the [CLS] token concatenated, logits upsampled bilinearly to the labels; --layers 4 "
        "concatenates the last 4 blocks (the '+ms' features). Trained on train, mIoU on test.")
    dense_common(seg, "scenes", MASKS)
    seg.add_argument("--layers", type=int, default=1, choices=(1, 4), help="last blocks whose tokens are used")
    seg.add_argument("--epochs", type=int, default=30, help="passes over the cached training features (DINOv2's "
                     "AdamW, lr 1e-3, poly schedule, batch 16)")
    seg.set_defaults(run=run)

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
    depth.set_defaults(run=run)

    video = protocols.add_parser(
        "video", help="DAVIS-style label propagation through video by patch-feature k-NN: J&F",
        description="DINO's video object segmentation (Table 5; Jabri et al.'s protocol): the first frame's mask "
        "is propagated frame by frame, each patch taking the labels of its top-k most similar patches of the first "
        "frame and the last n frames, within a local neighbourhood. Reports the DAVIS J&F mean and writes the "
        "propagated masks.")
    dense_common(video, "scenes-video", "scenes-video | a DAVIS 2017 folder (JPEGImages/480p/<seq>/, "
                 "Annotations/480p/<seq>/)", "frames are resized so that their shorter side is this many pixels, a "
                 "multiple of the patch, the longer side keeping the aspect (floored to a multiple of 64), uncropped, "
                 "as DINO reads DAVIS; masks are scored at the frames' own size (default: the frames' shorter side, "
                 "480 for DAVIS 480p, 128 for scenes-video; at least the training size)")
    video.add_argument("--n-last", type=int, default=7, help="previous frames in the queue (besides the first)")
    video.add_argument("--topk", type=int, default=5, help="neighbours each patch takes its labels from")
    video.add_argument("--radius", type=int, default=12, help="size of the local neighbourhood in patches")
    video.set_defaults(run=run)

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
    copy.set_defaults(run=run)
