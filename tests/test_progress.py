"""Progress of feature extraction (a log line every few seconds when stderr is not a terminal), and its loader
workers: the features of image i in row i, bit for bit as when decoding in the main process."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.data import sources
from selfsup.data.builtin import open_source
from selfsup.errors import UserError
from selfsup.eval.features import extract, loader_workers
from selfsup.eval.run import knn_of_backbone
from selfsup.nn import backbone_from_config
from selfsup.core.progress import ProgressLine, format_duration
from tiny import tiny_config


@pytest.fixture
def logged(monkeypatch, caplog):
    """The progress lines logged, with stderr not a terminal (as under nohup or SLURM)."""
    monkeypatch.setattr("sys.stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="selfsup")
    return lambda: [r.getMessage() for r in caplog.records]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("seconds, text", [(0.2, "<1s"), (4.4, "4s"), (45, "45s"), (59.4, "59s"), (59.6, "1m 00s"),
                                           (200, "3m 20s"), (3599.6, "1h 00m"), (3900, "1h 05m"),
                                           (90000, "25h 00m"), (float("inf"), "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_periodic_lines_with_count_percent_rate_and_eta_then_a_final_line(logged):
    clock = Clock()
    with ProgressLine(5000, "k-NN features mnist5k:train", every_s=10, clock=clock) as p:
        for _ in range(8):  # 512 images every 4 s: a line at 12 s, 24 s
            clock.t += 4
            p.update(512)
        clock.t += 1
        p.update(5000 - 8 * 512)
    assert logged() == [
        "k-NN features mnist5k:train: 1,536/5,000 img (30 %), 128 img/s, ETA 27s",
        "k-NN features mnist5k:train: 3,072/5,000 img (61 %), 128 img/s, ETA 15s",
        "k-NN features mnist5k:train done: 5,000 img in 33s (152 img/s)",
    ]


def test_a_short_job_logs_only_the_final_line_and_a_failed_one_none(logged):
    clock = Clock()
    with ProgressLine(100, "embed digits", every_s=10, clock=clock) as p:
        for _ in range(10):
            clock.t += 0.1
            p.update(10)
    assert logged() == ["embed digits done: 100 img in 1s (100 img/s)"]
    with pytest.raises(RuntimeError), ProgressLine(100, "embed digits", every_s=0, clock=clock) as p:
        raise RuntimeError
    assert len(logged()) == 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 PNGs of different sizes in 2 classes."""
    root = tmp_path_factory.mktemp("data") / "images"
    rng = np.random.default_rng(0)
    for i in range(40):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(8, 40, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:02d}.png")
    return root


def pixels(source, workers: int):
    return extract(lambda x: x.flatten(1), source, 16, batch=8, workers=workers)


def test_loader_workers_give_the_features_of_the_main_process_bit_for_bit(folder, tmp_path):
    source = open_source(str(folder))
    x0, y0 = pixels(source, workers=0)
    x2, y2 = pixels(source, workers=2)
    assert x0.shape == (40, 3 * 16 * 16) and torch.equal(x0, x2) and torch.equal(y0, y2)
    assert torch.equal(y0, source.labels())
    # tar shards (read by index, each worker with its own file handles) likewise
    assert main(["shards", str(folder), "--out", str(tmp_path / "shards"), "--shard-size", "16"]) == 0
    shards = open_source(f"{tmp_path}/shards/{{000000..000002}}.tar")
    assert getattr(shards, "streamed", False)
    s0, s2 = pixels(shards, workers=0), pixels(shards, workers=2)
    assert torch.equal(s0[0], s2[0]) and torch.equal(s0[1], s2[1])
    assert sorted(s0[0].sum(1).tolist()) == sorted(x0.sum(1).tolist())  # the same images


def test_default_workers():
    digits = open_source("digits")
    assert loader_workers(digits, 8) == 0  # in memory
    images = sources.FolderSource(Path("/x"), [Path(f"/x/{i}.png") for i in range(20)], None)
    assert loader_workers(images, 16) == 0  # under two batches
    assert 0 <= loader_workers(images, 8) <= 8


def test_a_decode_failure_in_a_worker_is_counted_in_the_main_process(folder, monkeypatch, caplog):
    decode = sources.decode

    def fails_on_07(path, channels=3):  # header fine, pixels not (the workers are forked: they inherit the patch)
        if path.name == "07.png":
            raise OSError("broken data stream")
        return decode(path, channels)

    monkeypatch.setattr(sources, "decode", fails_on_07)
    want = pixels(open_source(str(folder)), workers=0)
    source = open_source(str(folder))
    got = pixels(source, workers=2)
    assert torch.equal(want[0], got[0])  # row 7 repeats the next good image in both
    assert source.replaced == 1 and source.skipped.count == 1 and source.skipped.first == ["07.png (OSError)"]

    monkeypatch.setattr(sources, "decode", lambda path, channels=3: (_ for _ in ()).throw(OSError("broken")))
    with pytest.raises(UserError, match=r"^\S+: no image could be decoded$"):
        pixels(open_source(str(folder)), workers=2)


def test_the_k_nn_of_training_logs_what_it_computes(logged):
    cfg = tiny_config()
    torch.manual_seed(0)
    assert knn_of_backbone(backbone_from_config(cfg.backbone), cfg, "cpu") is not None
    done = [line for line in logged() if " done: " in line]
    assert [line.split(" done: ")[0] for line in done] == ["k-NN features digits:train", "k-NN features digits:test"]
