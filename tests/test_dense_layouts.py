"""Readers of the dense-label folder layouts (VOC, ADE20K, NYU-style depth, DAVIS 2017) on tiny folders."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.dense import IGNORE, VOC_CLASSES, detect_layout, open_depth, open_segmentation, open_video
from selfsup.errors import UserError

H, W = 20, 24
RNG = np.random.default_rng(0)


def rgb(path: Path, colour: int | None = None, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """An RGB image (random, or one grey level) written to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (RNG.integers(0, 256, (*size, 3)) if colour is None else np.full((*size, 3), colour)).astype(np.uint8)
    Image.fromarray(a).save(path)
    return a


def palette_png(path: Path, ids: np.ndarray) -> None:
    """Ids as a palette ('P') PNG, as VOC and DAVIS store them (colour k for index k)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette([c for k in range(256) for c in ((k * 37) % 256, (k * 91) % 256, (k * 151) % 256)])
    im.save(path)


def gray_png(path: Path, values: np.ndarray) -> None:
    """8-bit ('L') or, for uint16 values, 16-bit ('I;16') single-channel PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)


def ids(seed: int, top: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, top + 1, size).astype(np.uint8)


def make_voc(root: Path) -> dict[str, np.ndarray]:
    """VOCdevkit/VOC2012 under root: train = a, b; val = c. Masks use ids 0..20 and the 255 border."""
    base, masks = root / "VOCdevkit" / "VOC2012", {}
    for k, name in enumerate("abc"):
        rgb(base / "JPEGImages" / f"{name}.jpg")
        m = ids(k, 20)
        m[0] = IGNORE
        palette_png(base / "SegmentationClass" / f"{name}.png", m)
        masks[name] = m
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("c\n")
    return masks


def make_ade(root: Path, names: bool = False) -> dict[str, np.ndarray]:
    masks = {}
    for k, (sub, stem) in enumerate([("training", "ADE_train_1"), ("training", "ADE_train_2"),
                                     ("validation", "ADE_val_1")]):
        rgb(root / "images" / sub / f"{stem}.jpg")
        m = ids(k, 150)
        m[0, :3] = [0, 1, 150]
        gray_png(root / "annotations" / sub / f"{stem}.png", m)
        masks[stem] = m
    if names:  # as ADEChallengeData2016 ships it: tab-separated, synonyms after commas
        rows = ["Idx\tRatio\tTrain\tVal\tName", "1\t0.1576\t11664\t1172\twall", "2\t0.1072\t6046\t612\tbuilding, edifice"]
        rows += [f"{k}\t0.001\t1\t1\tthing{k}" for k in range(3, 151)]
        (root / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    return masks


def make_depth(root: Path, split: str = "train", n: int = 2) -> dict[str, np.ndarray]:
    depths = {}
    for k in range(n):
        rgb(root / split / f"{k:04d}.png")
        d = np.random.default_rng(k).integers(0, 10000, (H, W)).astype(np.uint16)
        d[0, 0] = 0  # no measurement
        gray_png(root / split / f"{k:04d}_depth.png", d)
        depths[f"{k:04d}"] = d
    return depths


def make_davis(root: Path, with_list: bool = True) -> dict[str, list[np.ndarray | None]]:
    """Sequences 'walk' (3 frames, frame 1 unannotated) and 'bike' (2 frames); val.txt lists walk."""
    masks = {}
    for seq, n in (("walk", 3), ("bike", 2)):
        masks[seq] = []
        for t in range(n):
            rgb(root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg", colour=40 * t + 20)
            if seq == "walk" and t == 1:
                masks[seq].append(None)
                continue
            m = ids(t, 3)
            m[-1, -1] = 255  # void
            palette_png(root / "Annotations" / "480p" / seq / f"{t:05d}.png", m)
            masks[seq].append(m)
    if with_list:
        (root / "ImageSets" / "2017").mkdir(parents=True)
        (root / "ImageSets" / "2017" / "val.txt").write_text("walk\n")
    return masks


def test_voc_palette_indices_and_border(tmp_path):
    masks = make_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        train = open_segmentation(root, "train")
        assert len(train) == 2 and train.classes == VOC_CLASSES and train.classes[15] == "person"
        assert train.has_masks and not train.has_depth and train.max_depth is None
    assert [f.name for f in train.files] == ["a.jpg", "b.jpg"]
    item = train[1]
    assert item.image.dtype == torch.uint8 and item.image.shape == (3, H, W) and item.depth is None
    assert item.mask.dtype == torch.int64 and torch.equal(item.mask, torch.from_numpy(masks["b"]).long())
    assert (item.mask[0] == IGNORE).all()  # VOC's border stays ignored
    test = open_segmentation(tmp_path, "test")  # test = val.txt
    assert len(test) == 1 and torch.equal(test[0].mask, torch.from_numpy(masks["c"]).long())


@pytest.mark.parametrize("names", [False, True])
def test_ade20k_ignore_mapping_and_class_names(tmp_path, names):
    masks = make_ade(tmp_path, names)
    train, test = open_segmentation(tmp_path, "train"), open_segmentation(tmp_path, "test")
    assert len(train) == 2 and len(test) == 1 and test.files[0].name == "ADE_val_1.jpg"
    want = masks["ADE_train_2"].astype(np.int64)
    want[want == 0] = IGNORE  # 'other' is ignored, 1..150 keep their ids
    mask = train[1].mask
    assert torch.equal(mask, torch.from_numpy(want)) and mask[0, :3].tolist() == [IGNORE, 1, 150]
    assert len(train.classes) == 151 and train.classes[0] == "background"
    assert train.classes[1:3] == (["wall", "building"] if names else ["class1", "class2"])


def test_depth_pairs_in_metres(tmp_path):
    depths = make_depth(tmp_path)
    src = open_depth(tmp_path, "train")
    assert len(src) == 2 and src.has_depth and not src.has_masks and src.classes == []
    item = src[1]
    assert item.mask is None and item.image.shape == (3, H, W) and item.depth.dtype == torch.float32
    assert torch.equal(item.depth, torch.from_numpy(depths["0001"].astype(np.float32) / np.float32(1000)))
    assert item.depth[0, 0] == 0
    assert src.max_depth == pytest.approx(max(int(d.max()) for d in depths.values()) / 1000)
    (tmp_path / "depth_scale.txt").write_text("5000\n")
    assert torch.equal(open_depth(tmp_path, "train")[0].depth,
                       torch.from_numpy(depths["0000"].astype(np.float32) / np.float32(5000)))


def test_depth_rgb_and_depth_subfolders(tmp_path):
    image = rgb(tmp_path / "test" / "rgb" / "x.png")
    d = np.arange(H * W, dtype=np.uint16).reshape(H, W)
    gray_png(tmp_path / "test" / "depth" / "x.png", d)
    assert detect_layout(tmp_path) == "depth"
    item = open_depth(tmp_path, "test")[0]
    assert torch.equal(item.image, torch.from_numpy(image).permute(2, 0, 1))
    assert torch.equal(item.depth, torch.from_numpy(d.astype(np.float32) / np.float32(1000)))


def test_davis_frames_and_masks_in_order(tmp_path):
    masks = make_davis(tmp_path)
    video = open_video(tmp_path)
    assert [s.name for s in video.sequences] == ["walk"] and len(video.files) == 3
    walk = video.sequences[0]
    assert len(walk) == 3
    for t in range(3):
        frame = walk.frame(t)
        assert frame.shape == (3, H, W) and abs(frame.float().mean().item() - (40 * t + 20)) < 2
    assert walk.mask(1) is None
    for t in (0, 2):
        want = masks["walk"][t].astype(np.uint8)
        want[want == 255] = 0  # void counts as background
        got = walk.mask(t)
        assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(want))  # uint8: DAVIS val is 2,000 masks
    (tmp_path / "ImageSets" / "2017" / "val.txt").unlink()  # no list: every sequence, sorted
    assert [s.name for s in open_video(tmp_path, "test").sequences] == ["bike", "walk"]


@pytest.mark.parametrize("make, kind", [(make_voc, "voc"), (make_ade, "ade20k"), (make_depth, "depth"),
                                        (make_davis, "davis")])
def test_detect_layout(tmp_path, make, kind):
    assert detect_layout(tmp_path) is None
    make(tmp_path)
    assert detect_layout(tmp_path) == kind


def error(call, *args) -> str:
    with pytest.raises(UserError) as e:
        call(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_error_no_layout(tmp_path):
    assert "not a VOC or ADE20K folder (expected JPEGImages/" in error(open_segmentation, tmp_path, "train")
    assert error(open_video, tmp_path).startswith(f"{tmp_path}: not a DAVIS folder")
    assert f"{tmp_path / 'nowhere'}: no such folder" == error(open_depth, tmp_path / "nowhere", "train")
    make_voc(tmp_path)
    assert "it has the VOC layout" in error(open_depth, tmp_path, "train")
    assert "split 'val'" in error(open_segmentation, tmp_path, "val")


def test_error_voc_list(tmp_path):
    make_voc(tmp_path)
    base = tmp_path / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("c\nd\n")
    assert f"{base / 'JPEGImages' / 'd.jpg'}: missing (id 'd' is listed in" in error(open_segmentation, base, "test")
    (base / "ImageSets" / "Segmentation" / "train.txt").unlink()
    assert error(open_segmentation, base, "train").startswith(f"{base / 'ImageSets' / 'Segmentation' / 'train.txt'}")


def test_error_ade_image_without_annotation(tmp_path):
    make_ade(tmp_path)
    rgb(tmp_path / "images" / "validation" / "ADE_val_2.jpg")
    message = error(open_segmentation, tmp_path, "test")
    assert message.startswith(str(tmp_path / "images" / "validation" / "ADE_val_2.jpg")) and "no annotation" in message


def test_error_mask_size(tmp_path):
    make_voc(tmp_path)
    bad = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "a.png"
    palette_png(bad, ids(0, 20, (H, W + 1)))
    src = open_segmentation(tmp_path, "train")  # listing does not open files; the item does
    assert error(src.__getitem__, 0).startswith(f"{bad}: 25x20 pixels, but its image a.jpg is 24x20")


def test_error_mask_values_and_mode(tmp_path):
    make_voc(tmp_path)
    bad = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "b.png"
    palette_png(bad, np.full((H, W), 30))
    assert error(open_segmentation(tmp_path, "train").__getitem__, 1).startswith(f"{bad}: class id 30")
    Image.new("RGB", (W, H)).save(bad)  # a mask converted to colours
    assert error(open_segmentation(tmp_path, "train").__getitem__, 1).startswith(f"{bad}: a RGB image; expected a")


def test_error_depth_png_mode(tmp_path):
    make_depth(tmp_path)
    bad = tmp_path / "train" / "0000_depth.png"
    Image.new("RGB", (W, H)).save(bad)
    message = error(open_depth(tmp_path, "train").__getitem__, 0)
    assert message.startswith(f"{bad}: a RGB image; expected a 16-bit")


def test_error_depth_missing_and_empty(tmp_path):
    make_depth(tmp_path)
    rgb(tmp_path / "train" / "0009.jpg")
    assert error(open_depth, tmp_path, "train") == \
        f"{tmp_path / 'train' / '0009.jpg'}: no depth map (expected {tmp_path / 'train' / '0009_depth.png'})"
    assert error(open_depth, tmp_path, "test").startswith(f"{tmp_path / 'test'}: missing")
    (tmp_path / "test").mkdir()
    assert error(open_depth, tmp_path, "test").startswith(f"{tmp_path / 'test'}: no images")
    (tmp_path / "train" / "0009.jpg").unlink()
    (tmp_path / "depth_scale.txt").write_text("mm")
    assert error(open_depth, tmp_path, "train").startswith(f"{tmp_path / 'depth_scale.txt'}: 'mm'; expected")


def test_error_unreadable_image(tmp_path):
    make_voc(tmp_path)
    bad = tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "a.jpg"
    bad.write_bytes(b"not a jpeg")
    assert error(open_segmentation(tmp_path, "train").__getitem__, 0).startswith(f"{bad}: not a readable image")


def test_error_davis(tmp_path):
    make_davis(tmp_path)
    (tmp_path / "ImageSets" / "2017" / "val.txt").write_text("walk\nswim\n")
    assert error(open_video, tmp_path).startswith(f"{tmp_path / 'JPEGImages' / '480p' / 'swim'}: missing (sequence")
    first = tmp_path / "Annotations" / "480p" / "walk" / "00000.png"
    first.unlink()
    assert error(open_video, tmp_path, "test").startswith(f"{first}: missing")
