"""Built-in sets and image folders."""
import numpy as np
import pytest
from PIL import Image

from selfsup.data.builtin import open_source
from selfsup.errors import UserError


def test_mnist5k_fixed_stratified_split():
    train, test = open_source("mnist5k", "train"), open_source("mnist5k", "test")
    assert len(train) == 4000 and len(test) == 1000
    assert train.labels().bincount().tolist() == [400] * 10
    img, label = test[0]
    assert img.shape == (3, 28, 28) and 0 <= label <= 9
    assert open_source("mnist5k", "test").labels().tolist() == test.labels().tolist()  # fixed


def write(path, mode="RGB", size=(10, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)


def test_folder_with_classes_and_grayscale(tmp_path):
    for c in ("cat", "dog"):
        for i in range(5):
            write(tmp_path / c / f"{i}.png", mode="L" if i % 2 else "RGB")
    src = open_source(str(tmp_path))
    assert src.classes == ["cat", "dog"] and len(src) == 10
    img, label = src[7]
    assert img.shape == (3, 12, 10) and label == 1
    train, test = open_source(str(tmp_path), "train"), open_source(str(tmp_path), "test")
    assert len(train) == 8 and len(test) == 2 and set(test.labels().tolist()) == {0, 1}


def test_unlabelled_folder_and_broken_files(tmp_path):
    write(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_text("not an image")
    (tmp_path / "c.png").write_bytes(b"")
    src = open_source(str(tmp_path))
    assert not src.labelled and len(src) == 1 and src.skipped.count == 2


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "no image files"),
    (lambda p: (p.mkdir(), (p / "x.jpg").write_text("text")), "no usable image"),
])
def test_bad_folders(tmp_path, make, message):
    path = tmp_path / "data"
    make(path)
    with pytest.raises(UserError, match=message):
        open_source(str(path))


def test_an_image_list_such_as_curates_selection(tmp_path, monkeypatch):
    """One path a line: relative ones from the current folder, else the list's; # comments and blank lines
    skipped; a missing file is one clear line."""
    for i in range(10):
        write(tmp_path / "pool" / f"{i}.png")
    listed = tmp_path / "out" / "selected.txt"
    listed.parent.mkdir()
    (tmp_path / "out" / "near.png").write_bytes((tmp_path / "pool" / "0.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    lines = ["# chosen by selfsup curate", "pool/1.png", str(tmp_path / "pool" / "2.png"), "", "near.png",
             *[f"pool/{i}.png" for i in range(3, 10)]]
    listed.write_text("\n".join(lines) + "\n")
    source = open_source(str(listed))
    assert [f.name for f in source.files] == ["1.png", "2.png", "near.png", *[f"{i}.png" for i in range(3, 10)]]
    assert source.files[2].parent.name == "out" and not source.labelled
    train, test = open_source(str(listed), "train"), open_source(str(listed), "test")
    assert (len(train), len(test)) == (8, 2) and not set(train.files) & set(test.files)
    listed.write_text("pool/1.png\npool/missing.png\n")
    with pytest.raises(UserError, match="selected.txt: 1 of 2 listed image.s. not found, the first: .*missing.png"):
        open_source(str(listed))
    listed.write_text("# nothing\n\n")
    with pytest.raises(UserError, match="an image list without any path"):
        open_source(str(listed))
