"""The feature cache: where it lives, that a hit skips the computation, that a changed checkpoint or folder misses."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.sources import open_folder
from selfsup.eval.cache import FeatureCache, cache_folder, file_identity, run_folder, stored_key
from selfsup.eval.features import available, select


@pytest.fixture
def images(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def test_cache_folder_is_the_run_folder_beside_the_file_or_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: dino\n")
    (run / "backbone.safetensors").write_bytes(b"x")
    assert run_folder(run) == run and run_folder(run / "backbone.safetensors") == run
    assert cache_folder(run) == cache_folder(run / "backbone.safetensors") == run / "features"
    (tmp_path / "b.safetensors").write_bytes(b"x")
    assert cache_folder(tmp_path / "b.safetensors") == tmp_path / "selfsup-features"
    assert cache_folder("dinov2_vits14") == tmp_path / "xdg" / "selfsup" / "features"
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        (ro / "b.safetensors").write_bytes(b"x")
        ro.chmod(0o555)
        assert cache_folder(ro / "b.safetensors") == tmp_path / "xdg" / "selfsup" / "features"


def test_a_hit_skips_the_computation_and_a_changed_checkpoint_or_folder_misses(tmp_path, images):
    ckpt = tmp_path / "b.safetensors"
    ckpt.write_bytes(b"weights")
    calls = []

    def compute():
        calls.append(1)
        return {"cls": torch.randn(6, 2, 4), "avgpool": torch.randn(6, 4)}, torch.arange(6)

    cache = FeatureCache(cache_folder(ckpt), ckpt)
    src = open_folder(images)
    first = cache.get("imgs", "train", src, compute, size=8)
    second = cache.get("imgs", "train", src, compute, size=8)
    assert len(calls) == 1 and torch.equal(first[0]["cls"], second[0]["cls"]) and torch.equal(first[1], second[1])
    cache.get("imgs", "train", src, compute, size=16)  # another input size
    FeatureCache(cache_folder(ckpt), ckpt, "random-init").get("imgs", "train", src, compute, size=8)
    assert len(calls) == 3
    ckpt.write_bytes(b"retrained weights")
    cache.get("imgs", "train", src, compute, size=8)
    assert len(calls) == 4
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "a" / "0.png")  # an image replaced
    cache.get("imgs", "train", open_folder(images), compute, size=8)
    assert len(calls) == 5
    FeatureCache(None, ckpt).get("imgs", "train", src, compute, size=8)  # caching off
    FeatureCache(None, ckpt).get("imgs", "train", src, compute, size=8)
    assert len(calls) == 7


def test_a_run_folder_is_known_by_the_file_load_reads(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: dino\n")
    (run / "checkpoint-00000010.pt").write_bytes(b"state")
    assert file_identity(run)["path"].endswith("checkpoint-00000010.pt")
    (run / "backbone.safetensors").write_bytes(b"export")  # what selfsup.load reads once it exists
    before = file_identity(run)
    assert before["path"].endswith("backbone.safetensors")
    (run / "backbone.safetensors").write_bytes(b"another export")
    assert file_identity(run) != before


def test_an_entry_replaces_the_ones_it_supersedes_and_those_of_deleted_checkpoints(tmp_path, images):
    ckpt, other = tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    ckpt.write_bytes(b"weights")
    other.write_bytes(b"other weights")
    folder = cache_folder(ckpt)
    folder.mkdir()
    (folder / "foreign.safetensors").write_bytes(b"not ours")

    def compute():
        return {"cls": torch.randn(6, 1, 4)}, torch.arange(6)

    def entries() -> list:
        return [f for f in folder.glob("*.safetensors") if stored_key(f) is not None]

    cache, src = FeatureCache(folder, ckpt), open_folder(images)
    cache.get("imgs", "train", src, compute, size=8)
    cache.get("imgs", "test", src, compute, size=8)
    cache.get("imgs", "train", src, compute, size=16)
    FeatureCache(folder, ckpt, "random-init").get("imgs", "train", src, compute, size=8)
    FeatureCache(folder, other).get("imgs", "train", src, compute, size=8)
    assert len(entries()) == 5
    ckpt.write_bytes(b"retrained weights")
    cache.get("imgs", "train", src, compute, size=8)  # supersedes the old train/size 8 entry only
    assert len(entries()) == 5
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "a" / "0.png")
    cache.get("imgs", "train", open_folder(images), compute, size=8)  # supersedes the entry of the old images
    assert len(entries()) == 5
    ckpt.unlink()
    FeatureCache(folder, other).get("imgs", "test", src, compute, size=8)  # every entry of b goes
    left = [stored_key(f) for f in entries()]
    assert sorted(k["split"] for k in left) == ["test", "train"]
    assert {k["checkpoint"]["path"] for k in left} == {str(other.resolve())}
    assert (folder / "foreign.safetensors").exists()


def test_feature_kinds():
    feats = {"cls": torch.arange(2 * 4 * 3.0).view(2, 4, 3), "avgpool": -torch.ones(2, 3)}
    assert torch.equal(select(feats, "cls"), feats["cls"][:, -1])
    assert torch.equal(select(feats, "last4"), feats["cls"].flatten(1))
    assert torch.equal(select(feats, "last2+avgpool"), torch.cat([feats["cls"][:, 2:].flatten(1), -torch.ones(2, 3)], 1))
    assert available(feats) == ["cls", "cls+avgpool", "last4", "last4+avgpool"]
    assert available({"cls": torch.ones(2, 1, 3)}) == ["cls"]  # a CNN: one pooled feature
    from selfsup.errors import UserError

    for bad in ("last5", "avg", "cls+max"):
        with pytest.raises(UserError):
            select(feats, bad)


def test_an_entry_of_an_older_cache_version_is_recomputed_and_replaced(tmp_path, images, monkeypatch):
    """VERSION 3: the evaluation view became torchvision's Resize + CenterCrop; features stored before are stale."""
    import selfsup.eval.cache as cache_module

    ckpt = tmp_path / "b.safetensors"
    ckpt.write_bytes(b"weights")
    folder, calls = cache_folder(ckpt), []

    def compute():
        calls.append(1)
        return {"cls": torch.randn(6, 1, 4)}, torch.arange(6)

    src = open_folder(images)
    monkeypatch.setattr(cache_module, "VERSION", cache_module.VERSION - 1)
    FeatureCache(folder, ckpt).get("imgs", "train", src, compute, size=8)
    monkeypatch.setattr(cache_module, "VERSION", cache_module.VERSION + 1)
    FeatureCache(folder, ckpt).get("imgs", "train", src, compute, size=8)
    assert len(calls) == 2  # not read from the older entry ...
    left = [stored_key(f) for f in folder.glob("*.safetensors")]
    assert [k["version"] for k in left] == [cache_module.VERSION] == [3]  # ... which is deleted
