"""`train.log`: everything a training command says, kept in its run folder.

Records are held in memory until the run folder exists (a bad input must leave no folder behind), then written
there; from then on each goes straight to the file. Lines meant for the file only (the per-step lines while a
progress bar is on the terminal) go through `write`.
"""
from __future__ import annotations

import logging
import time
from logging.handlers import MemoryHandler
from pathlib import Path

log = logging.getLogger("selfsup")
FORMAT = "%(asctime)s %(message)s"


class RunLog:
    def __init__(self) -> None:
        self.buffer: MemoryHandler | None = MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1)
        log.addHandler(self.buffer)
        self.file: logging.FileHandler | None = None

    def open(self, folder: Path) -> None:
        """Start writing to folder/train.log (appending: a resumed run continues its log)."""
        if self.file is not None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(folder / "train.log", encoding="utf-8")
        self.file.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S"))
        log.addHandler(self.file)
        if self.buffer is not None:
            log.removeHandler(self.buffer)
            self.buffer.setTarget(self.file)
            self.buffer.close()  # flushes what was said before the folder existed
            self.buffer = None

    def write(self, text: str) -> None:
        """Lines to the file only (before it is open: dropped)."""
        if self.file is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in text.splitlines():
            self.file.stream.write(f"{stamp} {line}\n")
        self.file.flush()

    def close(self) -> None:
        for h in (self.buffer, self.file):
            if h is not None:
                log.removeHandler(h)
                h.close()
        self.buffer = self.file = None
