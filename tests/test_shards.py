"""webdataset tar shards: `selfsup shards` packs a folder; ShardSource reads it back exactly; training
streams it split across ranks and loader workers with no sample twice, in the same order for any number
of workers."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selfsup.cli import main
from selfsup.data.builtin import open_source
from selfsup.data.loader import epoch_loader
from selfsup.data.shards import ShardBatches, ShardSource
from selfsup.data.views import MultiCrop
from tiny import tiny_config


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A labelled folder of 60 small images (3 classes) and its shards of 10."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(60):
        d = root / "folder" / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    assert main(["shards", str(root / "folder"), "--out", str(root / "shards"), "--shard-size", "10"]) == 0
    return root / "folder", f"{root}/shards/{{000000..000005}}.tar"


def test_shards_hold_every_image_and_label_bit_for_bit(packed):
    folder, spec = packed
    shards, files = open_source(spec), open_source(str(folder))
    assert len(shards) == len(files) == 60 and shards.classes == files.classes == ["class0", "class1", "class2"]
    by_pixels = {files[i][0].numpy().tobytes(): files[i][1] for i in range(len(files))}
    for i in range(len(shards)):
        img, label = shards[i]
        assert by_pixels.pop(img.numpy().tobytes()) == label
    assert not by_pixels
    train, test = ShardSource(spec, "train"), ShardSource(spec, "test")
    assert len(train) + len(test) == 60 and not set(train.keys) & set(test.keys) and len(test) > 0


def batches_of(source, rank: int, world: int, workers: int, start: int = 0) -> list[list[int]]:
    mc = MultiCrop(tiny_config().crops, seed=0)
    batches = ShardBatches(source, mc, global_batch=10, rank=rank, world=world, seed=0, buffer=8)
    return [v.index.tolist() for v in epoch_loader(batches, epoch=1, start=start, num_workers=workers)]


def test_ranks_and_workers_split_the_shards_with_no_sample_twice(packed):
    _, spec = packed
    source = ShardSource(spec)
    ranks = [batches_of(source, r, 2, workers=2) for r in range(2)]
    assert [len(r) for r in ranks] == [6, 6]  # 3 shards of 10 per rank, 5 per batch
    seen = [i for r in ranks for b in r for i in b]
    assert sorted(seen) == list(range(60))
    shards_of = [{int(source.shard[i]) for b in r for i in b} for r in ranks]
    assert shards_of == [{0, 2, 4}, {1, 3, 5}]


def test_batches_do_not_depend_on_workers_and_resume_mid_epoch(packed):
    _, spec = packed
    source = ShardSource(spec)
    one = batches_of(source, 0, 1, workers=0)
    assert one == batches_of(source, 0, 1, workers=2)
    assert batches_of(source, 0, 1, workers=2, start=5) == one[5:]
    assert one != sorted(one) and sorted(i for b in one for i in b) == list(range(60))  # shuffled, complete


def test_training_on_shards(packed, tmp_path):
    from tiny import ARGS

    _, spec = packed
    assert main(["train", *ARGS, "--data", spec, "--out", str(tmp_path), "--steps", "2"]) == 0
    assert (tmp_path / "backbone.safetensors").exists()


@pytest.mark.parametrize("spec, message", [("{dir}/shards/{{000000..000009}}.tar", "4 of 10 shard(s) not found"),
                                           ("{dir}/folder/class0/img0.png.tar", "not found")])
def test_bad_shard_specs_are_one_clear_line(packed, capsys, spec, message):
    folder, _ = packed
    assert main(["train", "--data", spec.format(dir=folder.parent), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_file_that_is_not_a_tar_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "000000.tar").write_bytes(b"not a tar at all" * 100)
    assert main(["train", "--data", str(tmp_path / "000000.tar"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable tar shard" in err[0]
