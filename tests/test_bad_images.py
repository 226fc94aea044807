"""A folder of broken and odd files: training and every evaluation complete on the images that decode, the
rest are skipped and reported in one line; a bad path or a folder with no usable image is one clear error."""
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
from tiny import ARGS

ODD = ["cmyk.jpg", "sixteen.png", "palette.png", "one.png", "truncated.jpg"]  # decodable, odd: used
BROKEN = ["empty.jpg", "notes.jpg", "cut_in_header.jpg"]  # skipped


def jpeg_bytes(rng, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / c / f"good{i}.jpg")
    a = root / "a"
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(a / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(a / "sixteen.png")
    pal = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("P", palette=Image.ADAPTIVE)
    pal.save(a / "palette.png", transparency=0)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(a / "one.png")
    big = jpeg_bytes(rng, 96)
    (a / "truncated.jpg").write_bytes(big[: len(big) * 2 // 3])  # cut in the scan: the top part decodes
    (a / "cut_in_header.jpg").write_bytes(big[:40])
    (a / "empty.jpg").write_bytes(b"")
    (a / "notes.jpg").write_text("this is not an image\n")
    return root


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_checked", {})
    return make_folder(tmp_path / "data")


def skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]


def test_odd_files_decode_broken_ones_are_counted_once(folder, caplog):
    caplog.set_level(logging.INFO, logger="selfsup")
    train, test = open_source(str(folder), "train"), open_source(str(folder), "test")
    names = {f.name for f in train.files + test.files}
    assert set(ODD) <= names and not set(BROKEN) & names
    assert len(train) + len(test) == 20 + len(ODD)
    for name in ODD:
        src = train if any(f.name == name for f in train.files) else test
        img, label = src[[f.name for f in src.files].index(name)]
        # 16-bit keeps its range: float value / 65535 (channels.py); 8-bit images of any mode are uint8 RGB
        assert img.dtype == (torch.float32 if name == "sixteen.png" else torch.uint8) and img.shape[0] == 3
        assert label == 0
        assert src.replaced == 0  # decoded, not replaced by the next file
        if name == "one.png":
            assert img.shape == (3, 1, 1) and img.flatten().tolist() == [200, 10, 10]
    lines = skip_lines(caplog)
    assert len(lines) == 1 and "skipped 3 unusable file(s)" in lines[0]
    assert all(name in lines[0] for name in BROKEN)
    assert train.skipped.count == 3  # the folder's unusable files, counted on every source opened on it


def test_a_file_that_fails_only_when_decoded_is_replaced_and_counted(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(sources, "_checked", {})
    for i, value in enumerate((1, 9)):
        Image.new("RGB", (16, 16), (value,) * 3).save(tmp_path / f"x{i}.png")
    decode = sources.decode

    def fails_on_x0(path, channels=3):  # a file whose header reads but whose pixels do not (the header check passes)
        if path.name == "x0.png":
            raise OSError("broken data stream")
        return decode(path, channels)

    monkeypatch.setattr(sources, "decode", fails_on_x0)
    caplog.set_level(logging.INFO, logger="selfsup")
    src = open_source(str(tmp_path))
    assert len(src) == 2
    for _ in range(3):
        img, _ = src[0]
        assert int(img[0, 0, 0]) == 9  # the next good file
    assert src.skipped.count == 3
    lines = skip_lines(caplog)
    assert len(lines) == 1 and "x0.png unusable (OSError)" in lines[0]


def test_training_and_every_evaluation_complete(folder, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="selfsup")
    run = tmp_path / "run"
    assert main(["train", *ARGS, "--data", str(folder), "--out", str(run), "--steps", "2"]) == 0
    assert len(skip_lines(caplog)) == 1
    for protocol in ("knn", "linear", "lowshot", "cluster", "retrieval"):
        monkeypatch.setattr(sources, "_checked", {})
        caplog.clear()
        assert main(["eval", protocol, "--checkpoint", str(run), "--data", str(folder), "--device", "cpu"]) == 0, protocol
        assert len(skip_lines(caplog)) == 1, protocol


@pytest.mark.parametrize("case", ["missing", "nothing_usable", "no_images"])
def test_no_usable_data_is_one_clear_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sources, "_checked", {})
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
        if case == "nothing_usable":
            (data / "empty.jpg").write_bytes(b"")
            (data / "notes.png").write_text("not an image")
        else:
            (data / "readme.txt").write_text("no images here")
    assert main(["train", *ARGS, "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"selfsup: error: {data}")
    assert {"missing": "no such file", "nothing_usable": "no usable image", "no_images": "no image files"}[case] in err[0]
