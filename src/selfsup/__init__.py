"""selfsup: self-supervised visual representation learning (SimCLR, MoCo, BYOL, DINO, iBOT, DINOv2).

The Python API: `train`, `embed`, `evaluate`, `export` (what the commands do) and `load`, `build_backbone`."""
from .api import Run, embed, evaluate, export, train
from .nn import build_backbone
from .weights import load

__version__ = "0.1.0"
__all__ = ["Run", "build_backbone", "embed", "evaluate", "export", "load", "train", "__version__"]
