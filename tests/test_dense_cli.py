"""`selfsup eval attention-masks|segment|depth|video|copydetect` end to end: a small ViT on the built-in scenes
and on folders in the VOC and DAVIS layouts, the --json contract, the cache, and one line for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_dense_layouts import ids, make_davis, make_depth, make_voc, palette_png, rgb

from selfsup.cli import main
from selfsup.config import Config, apply
from selfsup.nn import backbone_from_config
from selfsup.weights import Loaded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-block ViT-tiny/16 exported as a backbone for 64-px inputs (a 4 x 4 grid)."""
    cfg = Config()
    apply(cfg, {"backbone": {"arch": "vit_tiny", "patch_size": 16, "depth": 1, "img_size": 64}}, "test")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    Loaded(backbone_from_config(cfg.backbone), cfg.backbone, 64, cfg.crops.mean, cfg.crops.std, "tiny").save(path)
    return path


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pictures of a checkpoint outside a run folder go to ./selfsup-eval


def run_json(capsys, *args) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("protocol,key,extra", [
    ("attention-masks", "jaccard_best", []), ("segment", "miou", ["--epochs", "1"]),
    ("depth", "rmse", ["--epochs", "1"]), ("copydetect", "map", ["--queries", "10"]),
    ("video", "jf", ["--data", "scenes-video"])])
def test_each_protocol_gives_its_headline_on_the_builtin_data(tiny, capsys, caplog, protocol, key, extra):
    r = run_json(capsys, protocol, "--checkpoint", str(tiny), *extra)
    assert r["protocol"] == protocol and 0 <= r[key] <= (20 if key == "rmse" else 100)
    caplog.clear()
    with caplog.at_level("INFO", logger="selfsup"):
        again = run_json(capsys, protocol, "--checkpoint", str(tiny), *extra)
    assert "from the cache" in caplog.text and again[key] == pytest.approx(r[key])


def test_segment_and_video_read_the_voc_and_davis_layouts(tiny, tmp_path, capsys):
    make_voc(tmp_path / "voc")
    r = run_json(capsys, "segment", "--checkpoint", str(tiny), "--data", str(tmp_path / "voc"), "--epochs", "2",
                 "--no-cache")
    assert len(r["classes"]) == 21 and 0 <= r["miou"] <= 100
    make_davis(tmp_path / "davis")
    assert main(["eval", "video", "--checkpoint", str(tiny), "--data", str(tmp_path / "davis")]) == 2
    assert "no sequence has 3 annotated frames" in capsys.readouterr().err  # walk's frame 1 has no mask
    palette_png(tmp_path / "davis" / "Annotations" / "480p" / "walk" / "00001.png", ids(1, 3))
    r = run_json(capsys, "video", "--checkpoint", str(tiny), "--data", str(tmp_path / "davis"), "--no-cache")
    assert r["sequences"][0]["sequence"] == "walk" and 0 <= r["jf"] <= 100
    # frames of 20 x 24 read at the training size's shorter side (64 x 76 -> 64 x 64, patch 16), whole; the
    # propagated masks are scored and written at the frames' own size, as DAVIS is
    assert r["size"] == 64
    written = sorted(Path(r["masks"], "walk").glob("*.png"))
    assert len(written) == 3 and all(Image.open(f).size == (24, 20) for f in written)
    # sequences of different frame sizes in one set (a portrait 'ride' read at 128 x 64, walk at 64 x 64), each on
    # its own grid
    for t in range(3):
        rgb(tmp_path / "davis" / "JPEGImages" / "480p" / "ride" / f"{t:05d}.jpg", size=(40, 16))
        palette_png(tmp_path / "davis" / "Annotations" / "480p" / "ride" / f"{t:05d}.png", ids(t, 2, (40, 16)))
    (tmp_path / "davis" / "ImageSets" / "2017" / "val.txt").write_text("walk\nride\n")
    r = run_json(capsys, "video", "--checkpoint", str(tiny), "--data", str(tmp_path / "davis"), "--no-cache")
    assert [s["sequence"] for s in r["sequences"]] == ["walk", "ride"]
    assert [Image.open(f).size for f in sorted(Path(r["masks"], "ride").glob("*.png"))] == [(16, 40)] * 3
    make_depth(tmp_path / "nyu", "train")
    make_depth(tmp_path / "nyu", "test")
    r = run_json(capsys, "depth", "--checkpoint", str(tiny), "--data", str(tmp_path / "nyu"), "--epochs", "1",
                 "--no-cache")
    assert r["rmse"] >= 0 and r["max_depth"] == pytest.approx(9.999, abs=0.01)


@pytest.mark.parametrize("args,says", [
    (["segment", "--data", "/no/such/folder"], "/no/such/folder"),
    (["attention-masks", "--size", "40"], "--size 40"),
    (["video", "--data", "scenes"], "scenes"),
])
def test_bad_input_is_one_line(tiny, capsys, args, says):
    assert main(["eval", *args[:1], "--checkpoint", str(tiny), *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup: error:") and says in err and len(err.splitlines()) == 1


def test_a_run_on_scenes_reports_its_attention_masks_beside_random_init(tmp_path, capsys):
    """`selfsup train --data scenes` ends with the attention-mask Jaccard of the trained and the random-init ViT;
    the report shows it with the dense protocols' table and pictures."""
    args = ["train", "--data", "scenes", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8",
            "backbone.depth=1", "backbone.patch_size=16", "crops.n_local=2", "dino.out_dim=64", "dino.hidden_dim=32",
            "dino.bottleneck_dim=16", "data.num_workers=0", "train.threads=1", "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    for name in ("trained", "random_init"):
        assert 0 <= result["attention_masks"][name]["jaccard_best"] <= 100
    assert "best head" in out and "mean over heads" in out
    assert main(["eval", "segment", "--checkpoint", str(tmp_path / "run"), "--epochs", "1"]) == 0
    assert (tmp_path / "run" / "eval" / "segment-scenes.png").exists()
    assert main(["report", str(tmp_path / "run"), "--n", "1"]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "attention masks against the objects" in html and "segment" in html and "segment-scenes.png" in html
