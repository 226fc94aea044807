"""Files a reader may see while they are written: the one atomic write (checkpoints, exports, feature caches,
embeddings, results), and the one reader of a run's metrics.jsonl, which a running job appends to."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None]) -> None:
    """Write `path` so that a reader sees the old file or the whole new one, even after a crash or a power cut:
    `data` (bytes, text, or a function that writes the path it is given: torch.save, safetensors) goes to a
    temporary file beside it (`.NAME.tmp-PID`), which is fsynced and renamed into place, then the folder is
    fsynced. A writer killed mid-write leaves only the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (none while there is no file); a line that is not a JSON object (the torn
    last line of a running or killed job) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
