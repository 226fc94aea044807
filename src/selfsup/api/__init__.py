"""selfsup's Python API: what the commands do, as functions (`selfsup.train`, `selfsup.embed`,
`selfsup.evaluate`, `selfsup.export`, beside `selfsup.load`)."""
from ..convert import export
from .embed import embed
from .evaluate import evaluate
from .run import Run, train

__all__ = ["Run", "embed", "evaluate", "export", "train"]
