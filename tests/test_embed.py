"""`selfsup embed`: features, labels and file names of every image, in one safetensors file."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import selfsup
from selfsup.cli import main
from selfsup.config import Config
from selfsup.data.views import eval_transform
from selfsup.nn import backbone_from_config
from selfsup.weights import save_backbone


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny ViT (1 block, 16 px input, 4 px patches, 2 registers) exported as selfsup does after training."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.backbone.arch, cfg.backbone.depth, cfg.backbone.patch_size, cfg.backbone.img_size = "vit_tiny", 1, 4, 16
    cfg.backbone.n_registers, cfg.crops.global_size = 2, 16
    path = tmp_path_factory.mktemp("run") / "backbone.safetensors"
    save_backbone(backbone_from_config(cfg.backbone, drop_path=0.0), cfg, path)
    return path


def read(path):
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["selfsup"])
    return load_file(str(path)), meta


def test_embed_mnist5k(tmp_path, export, capsys):
    out = tmp_path / "mnist.safetensors"
    assert main(["embed", "--checkpoint", str(export), "--data", "mnist5k", "--out", str(out), "--patch-mean",
                 "--batch-size", "500"]) == 0
    tensors, meta = read(out)
    assert tensors.keys() == {"features", "patch_mean", "labels"}
    assert tensors["features"].shape == tensors["patch_mean"].shape == (5000, 192)
    assert tensors["features"].dtype == torch.float32 and torch.isfinite(tensors["features"]).all()
    assert torch.equal(tensors["labels"], selfsup.data.builtin.open_source("mnist5k").labels())
    assert meta["classes"] == [str(d) for d in range(10)] and meta["files"] is None
    assert (meta["image_size"], meta["data"]) == (16, "mnist5k")
    assert "5000 images of mnist5k" in capsys.readouterr().out


def write_images(root, sizes):
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)


def test_embed_image_folder_with_classes(tmp_path, export):
    sizes = {"cat/a.png": (20, 30), "cat/b.jpg": (16, 16), "dog/c.png": (40, 24), "dog/sub/d.png": (12, 12)}
    write_images(tmp_path / "pets", sizes)
    out = tmp_path / "feats" / "pets.safetensors"  # the folder is created
    assert main(["embed", "--checkpoint", str(export.parent), "--data", str(tmp_path / "pets"), "--out", str(out),
                 "--batch-size", "3", "--device", "cpu"]) == 0
    tensors, meta = read(out)
    assert tensors.keys() == {"features", "labels"} and tensors["features"].shape == (4, 192)
    assert meta["files"] == ["cat/a.png", "cat/b.jpg", "dog/c.png", "dog/sub/d.png"]
    assert meta["classes"] == ["cat", "dog"] and tensors["labels"].tolist() == [0, 0, 1, 1]
    # row i is the backbone's [CLS] of file i, in its evaluation view
    loaded = selfsup.load(export)
    img = torch.from_numpy(np.array(Image.open(tmp_path / "pets" / "dog/c.png").convert("RGB"))).permute(2, 0, 1)
    with torch.no_grad():
        want = loaded.backbone(eval_transform(img, 16, loaded.mean, loaded.std)[None])[0]
    torch.testing.assert_close(tensors["features"][2], want, rtol=1e-5, atol=1e-5)


def test_embed_unlabelled_folder_has_no_labels(tmp_path, export):
    write_images(tmp_path / "photos", {"x.png": (16, 16), "y.png": (24, 16)})
    out = tmp_path / "photos.safetensors"
    assert main(["embed", "--checkpoint", str(export), "--data", str(tmp_path / "photos"), "--out", str(out),
                 "--patch-mean"]) == 0
    tensors, meta = read(out)
    assert tensors.keys() == {"features", "patch_mean"} and meta["classes"] is None
    assert meta["files"] == ["x.png", "y.png"]


def test_embed_errors(tmp_path, export, capsys):
    assert main(["embed", "--checkpoint", str(export), "--data", "digits", "--out", str(tmp_path / "f.npy")]) == 2
    assert "expected a file name ending in .safetensors" in capsys.readouterr().err
    out = str(tmp_path / "f.safetensors")
    assert main(["embed", "--checkpoint", str(tmp_path), "--data", "digits", "--out", out]) == 2
    assert "expected a selfsup run folder" in capsys.readouterr().err


def test_embed_decodes_with_loader_workers_and_logs_progress_when_stderr_is_not_a_terminal(tmp_path, export):
    write_images(tmp_path / "many", {f"{i:02d}.png": (12 + i % 7, 16 + i % 5) for i in range(40)})
    args = ["embed", "--checkpoint", str(export), "--data", str(tmp_path / "many"), "--batch-size", "8"]
    cmd = [sys.executable, "-m", "selfsup", *args, "--workers", "2", "--out", str(tmp_path / "w.safetensors")]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stderr
    assert f"embed {tmp_path / 'many'} done: 40 img in " in done.stderr and "\r" not in done.stderr  # a line, no bar
    assert main([*args, "--workers", "0", "--out", str(tmp_path / "m.safetensors")]) == 0
    (workers, meta), (main_process, _) = read(tmp_path / "w.safetensors"), read(tmp_path / "m.safetensors")
    assert meta["files"] == [f"{i:02d}.png" for i in range(40)]
    assert torch.equal(workers["features"], main_process["features"])
    assert main([*args, "--workers", "-1", "--out", str(tmp_path / "x.safetensors")]) == 2
