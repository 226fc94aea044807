import pytest
import torch

from selfsup.config import Config, apply, load_recipe


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tests are many small ops: one thread each is faster on 2 shared cores


def tiny_config(**sections) -> Config:
    """DINO at the smallest size that still exercises every code path."""
    cfg = Config()
    load_recipe(cfg, "dino_mnist5k")
    apply(cfg, {
        "data": {"source": "digits", "num_workers": 0},
        "backbone": {"depth": 1, "drop_path": 0.1},
        "crops": {"n_local": 2},
        "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
        "optim": {"batch_size": 16, "steps": 6},
        "train": {"checkpoint_every": 3, "keep_last": 5},
        "eval": {"final": False},
    }, "test")
    apply(cfg, sections, "test")
    return cfg
