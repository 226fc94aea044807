"""`selfsup shards FOLDER --out DIR`: pack a folder of images into webdataset tar shards for streaming."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from ..cli import print_json
from ..core.errors import UserError
from ..data.sources import open_folder

log = logging.getLogger("selfsup")


def register(sub) -> None:
    p = sub.add_parser(
        "shards",
        help="pack a folder of images into webdataset tar shards",
        description="Pack every usable image of FOLDER (labels from its class subfolders, if any) into tar "
        "shards DIR/000000.tar, DIR/000001.tar, ... in a seeded random order, the files' bytes unchanged. "
        "Train on them with --data 'DIR/{000000..NNNNNN}.tar' (the command prints the exact spec).",
    )
    p.add_argument("folder", help="a folder of images (class subfolders give labels)")
    p.add_argument("--out", required=True, help="folder for the shards (created; must hold no shards yet)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order of the images across shards")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import webdataset as wds
    except ImportError:
        raise UserError("selfsup shards needs the package webdataset (pip install webdataset)") from None
    if args.shard_size < 1:
        raise UserError(f"--shard-size {args.shard_size}: expected at least 1")
    out = Path(args.out)
    if out.is_dir() and any(out.glob("*.tar")):
        raise UserError(f"--out {out}: already holds .tar files (choose an empty folder)")
    out.mkdir(parents=True, exist_ok=True)
    source = open_folder(Path(args.folder).expanduser())
    labels = source.labels().tolist()
    order = np.random.default_rng(args.seed).permutation(len(source.files))
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=args.shard_size, verbose=0) as sink:
        for key, i in enumerate(order.tolist()):
            f = source.files[i]
            ext = f.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            sample = {"__key__": f"{key:08d}", ext: f.read_bytes()}
            if source.classes:
                sample["cls"] = labels[i]
            sink.write(sample)
        n_shards = sink.shard
    if source.classes:
        (out / "classes.txt").write_text("\n".join(source.classes) + "\n")
    spec = f"{out}/{{{0:06d}..{n_shards - 1:06d}}}.tar" if n_shards > 1 else f"{out}/000000.tar"
    what = f", {len(source.classes)} classes" if source.classes else ""
    print(f"{len(order)} images{what} -> {n_shards} shard(s) in {out}\ntrain with: --data '{spec}'")
    if args.json:
        print_json({"images": len(order), "shards": n_shards, "spec": spec, "classes": source.classes})
    return 0
