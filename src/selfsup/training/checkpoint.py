"""Checkpoints that survive anything: written to a temporary file, fsynced, then renamed into place, so a
reader only ever sees a complete file. Each holds all a run needs to continue: every network (student,
teacher, heads), the method's buffers (centre), the optimiser, the step, the config and the RNG states."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError
from ..core.io import atomic_write

log = logging.getLogger("selfsup")
PATTERN = re.compile(r"^checkpoint-(\d{8})\.pt$")
TEMPORARY = ".checkpoint-*.pt.tmp-*"  # what a writer killed mid-write leaves behind


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if PATTERN.match(p.name))


def step_of(path: Path) -> int:
    return int(PATTERN.match(path.name).group(1))


def last_before(run_dir: Path, step: int) -> Path | None:
    """The newest checkpoint saved at or before `step`."""
    return next((p for p in reversed(checkpoints(run_dir)) if step_of(p) <= step), None)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep_last: int, keep_steps: tuple[int, ...] = ()) -> Path:
    """Save, then delete all but the last `keep_last` checkpoints (and the newest at or before each of
    `keep_steps`: the last good one before a collapse, the first stage's last) and any temporary file of a killed
    writer."""
    path = run_dir / f"checkpoint-{step:08d}.pt"
    atomic_save(state, path)
    kept = {last_before(run_dir, s) for s in keep_steps}
    for old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        if old not in kept:
            old.unlink(missing_ok=True)
    for stale in run_dir.glob(TEMPORARY):
        stale.unlink(missing_ok=True)
    return path


def latest(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def load_latest(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of a run that loads; an unreadable one (a copy cut short) is passed over."""
    for path in reversed(checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            log.warning("%s; trying the one before", e)
    return None


def read_run(spec: str, key: str) -> dict:
    """The checkpoint a config key names (a run folder: its latest), for a method's `inputs`."""
    if not Path(spec).exists():
        raise UserError(f"{key}={spec}: no such run folder or checkpoint")
    return load_checkpoint(Path(spec))


def load_checkpoint(path: Path) -> dict:
    """A selfsup checkpoint file, or the latest one of a run folder."""
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise UserError(f"{path}: no checkpoint-*.pt in this folder (expected a selfsup run folder)")
        path = found
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not a checkpoint
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "method_state" not in state or "config" not in state:
        raise UserError(f"{path}: not a selfsup checkpoint (expected keys 'method_state' and 'config')")
    return state
