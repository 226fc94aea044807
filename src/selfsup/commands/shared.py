"""What the evaluation commands share (eval, its dense protocols, viz): the backbone to evaluate, and the record
of a result."""
from __future__ import annotations

import argparse
import json

from ..cli import print_json
from ..core.device import resolve_device
from ..eval.cache import run_folder, slug
from ..weights import load


def loaded_backbone(args: argparse.Namespace):
    """The backbone to evaluate, with its input size; `--random-init` builds the same architecture afresh."""
    loaded = load(args.checkpoint)
    if args.random_init:
        loaded.backbone = loaded.random_init(seed=0)
    return loaded, resolve_device(args.device)


def finish(args: argparse.Namespace, protocol: str, result: dict) -> int:
    """Record the result in the run folder (for `selfsup report`) and print the JSON line."""
    result = {"protocol": protocol, "checkpoint": str(args.checkpoint), "data": args.data,
              "random_init": args.random_init, **({"features": args.features} if "features" in args else {}), **result}
    run = run_folder(args.checkpoint)
    if run is not None:
        out = run / "eval" / f"{protocol}-{slug(args.data)}{'-random-init' if args.random_init else ''}.json"
        try:
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
        except OSError:
            pass  # a read-only run folder: the result is still printed
    if args.json:
        print_json(result)
    return 0
