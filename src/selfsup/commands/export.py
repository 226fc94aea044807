"""`selfsup export`: a backbone in another format (selfsup.convert:export)."""
from __future__ import annotations

import argparse

from ..convert import FORMATS, export


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="write a backbone as safetensors, a Hugging Face folder, a timm state dict or ONNX",
        description="Any backbone `selfsup.load` reads (a run folder, a checkpoint, an export, an official "
        "DINO/DINOv2 file, a Hugging Face DINOv2 folder, a timm DINOv2 state dict), written as: safetensors "
        "(selfsup's export, --out FILE.safetensors); hf (a folder transformers.AutoModel.from_pretrained loads: "
        "Dinov2Model, or Dinov2WithRegistersModel for a ViT with registers; needs transformers); timm (a state "
        "dict in timm's vit_*_dinov2 layout, --out FILE.safetensors or FILE.pth; the model arguments are printed "
        "and, in a .safetensors, kept in its metadata); onnx (--out FILE.onnx: normalised pixel_values in, "
        "x_norm_clstoken and x_norm_patchtokens out; dynamic batch, and dynamic image size except for a ViT whose "
        "position embedding is resized with antialiasing (DINOv2's register models), exported at the fixed "
        "evaluation size; needs onnx). A ViT without layer scale or qkv bias exports to hf and timm with the "
        "identity in their place; a ResNet exports to safetensors and onnx only.")
    p.add_argument("source", help="a run folder, checkpoint, export, official or timm file, or Hugging Face folder")
    p.add_argument("--format", required=True, help=" | ".join(FORMATS))
    p.add_argument("--out", required=True, help="the output file (a folder for --format hf)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = export(args.source, args.format, args.out)
    print(f"{args.source} -> {out} ({args.format})")
    return 0
