"""`selfsup`: the command line. Each command group lives in selfsup/commands/<name>.py and registers itself."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from .core.errors import UserError

COMMANDS = ["train", "eval", "bench", "embed", "export", "shards", "curate", "viz", "report"]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("selfsup").setLevel(logging.INFO)


def print_json(obj) -> None:
    """The last line of stdout is one JSON object (the `--json` contract)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selfsup",
        description="Self-supervised visual representation learning: SimCLR, MoCo, BYOL, DINO, iBOT, DINOv2.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfsup: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
