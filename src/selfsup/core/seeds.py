"""The random number generators of a run: their whole state (saved with checkpoints, restored on resume) and
the seed of each training step."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_seed(seed: int, step: int) -> int:
    """The seed of one step (the torch RNG, and the per-sample streams of drop path): a resumed run repeats it
    exactly."""
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**63)
