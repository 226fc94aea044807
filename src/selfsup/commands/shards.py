"""`selfsup shards FOLDER --out DIR`: pack a folder of images into webdataset tar shards for streaming (the
library's `selfsup.data.shards.pack_folder`)."""
from __future__ import annotations

import argparse

from ..cli import print_json
from ..data.shards import pack_folder


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
    r = pack_folder(args.folder, args.out, args.shard_size, args.seed)
    what = f", {len(r['classes'])} classes" if r["classes"] else ""
    print(f"{r['images']} images{what} -> {r['shards']} shard(s) in {args.out}\ntrain with: --data '{r['spec']}'")
    if args.json:
        print_json(r)
    return 0
