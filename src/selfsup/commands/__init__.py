"""One module per command group; each has `register(subparsers)` and sets `run` on its parser."""
