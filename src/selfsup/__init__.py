"""selfsup: self-supervised visual representation learning (SimCLR, MoCo, BYOL, DINO, iBOT, DINOv2)."""
from .nn import build_backbone
from .weights import load

__version__ = "0.1.0"
__all__ = ["build_backbone", "load", "__version__"]
