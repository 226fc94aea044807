"""`selfsup curate` and selfsup.curate: de-duplication, protection, retrieval, hierarchical k-means, balancing."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selfsup import curate as cu
from selfsup.cli import main
from selfsup.config import Config
from selfsup.nn import backbone_from_config
from selfsup.weights import save_backbone


def unit(*rows) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_components_of_a_hand_made_graph():
    # 0-3-5 chained, 1-4, 2 and 6 alone: labels are the first node of each component
    pairs = np.array([[3, 5], [0, 3], [4, 1]])
    assert cu.components(7, pairs).tolist() == [0, 1, 2, 0, 1, 0, 6]
    assert cu.components(3, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2]


def test_duplicate_groups_follow_the_threshold_transitively():
    # a ~ b (cos 0.995), b ~ c (0.995) but a, c at 0.98: one group through b; d orthogonal
    ang = np.deg2rad([0.0, 5.7, 11.4, 90.0])
    x = torch.tensor(np.stack([np.cos(ang), np.sin(ang), np.zeros(4)], 1), dtype=torch.float32)
    labels = cu.duplicate_groups(x, 0.99)
    assert labels.tolist() == [0, 0, 0, 3]
    assert cu.duplicate_groups(x, 0.999).tolist() == [0, 1, 2, 3]
    pairs = cu.similar_pairs(x * 7.0, 0.97)  # scale does not matter: cosine
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (0, 2), (1, 2)]


def test_similar_pairs_chunked_matches_dense(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(60, 16, generator=gen)
    x = torch.cat([base, base[:20] + 0.05 * torch.randn(20, 16, generator=gen)])
    monkeypatch.setattr(cu, "CHUNK_ELEMENTS", 7 * 80)  # 7 rows a band
    got = {tuple(p) for p in cu.similar_pairs(x, 0.95).tolist()}
    xn = torch.nn.functional.normalize(x, dim=1)
    s = xn @ xn.T
    want = {(i, j) for i in range(80) for j in range(i + 1, 80) if s[i, j] >= 0.95}
    assert got == want and {(i, 60 + i) for i in range(20)} <= got


def test_crop_views_find_what_whole_images_miss():
    # 0 and 1 are far apart as wholes (cos 0), but a crop view of 1 matches 0; 2 is alone
    x = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    view = unit([0, 0.7, 0.7], [1, 0.02, 0], [0.5, 0.5, 0.1])
    assert cu.similar_pairs(x, 0.99).tolist() == []
    assert cu.similar_pairs(x, 0.99, views=[view]).tolist() == [[0, 1]]
    assert cu.duplicate_groups(x, 0.99, views=[view]).tolist() == [0, 0, 2]
    hit, near, sims = cu.protect(x, unit([0, 0, 1]), 0.99, use_faiss=False, pool_views=[view])
    assert hit.tolist() == [2] and near.tolist() == [0]
    hit, near, _ = cu.protect(x, unit([0, 0.9, 0.3]), 0.99, use_faiss=False, protected_views=[unit([1, 0, 0])])
    assert hit.tolist() == [0] and near.tolist() == [0]  # a crop of the protected image is the pool's image 0
    imgs = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).reshape(2, 3, 10, 10)
    crops = cu.crop_views(imgs, 0.64)
    assert len(crops) == 5 and all(c.shape == imgs.shape for c in crops)
    assert crops[1][0, 0, 0, 0] < crops[4][0, 0, -1, -1]  # top-left and bottom-right corners
    with pytest.raises(cu.UserError, match="area in"):
        cu.crop_views(imgs, 1.0)
    grid = cu.crop_views(imgs, 0.64, grid=3)  # 8 x 8 crops at rows and columns 0, 1, 2, row by row
    assert len(grid) == 9 and all(c.shape == imgs.shape for c in grid)
    for k, (t, l) in enumerate((t, l) for t in (0, 1, 2) for l in (0, 1, 2)):
        want = F.interpolate(imgs[..., t:t + 8, l:l + 8], size=(10, 10), mode="bicubic", antialias=True)
        assert torch.equal(grid[k], want)
    assert torch.equal(grid[4], crops[0]) and torch.equal(grid[0], crops[1])  # centre and top-left of FiveCrop


def test_protect_and_per_query_retrieval():
    pool = unit([1, 0, 0], [0.99, 0.14, 0], [0, 1, 0], [0, 0.1, 1], [-1, 0, 0])
    hit, near, sims = cu.protect(pool, unit([0, 0, 1], [1, 0, 0]), 0.98)
    assert hit.tolist() == [0, 1, 3] and near.tolist() == [1, 1, 0] and (sims >= 0.98).all()
    assert cu.retrieve_per_query(unit([0, 1, 0.05]), pool, 2).tolist() == [2, 3]
    assert cu.retrieve_per_query(unit([1, 0.01, 0], [0, 1, 0]), pool, 1).tolist() == [0, 2]
    sims, idx = cu.knn(unit([1, 0, 0]), pool, 10)  # k capped at the database size
    assert idx.shape == (1, 5) and idx[0, 0] == 0 and idx[0, -1] == 4


def blobs(sizes, dim=16, spread=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(len(sizes), dim, generator=gen), dim=1) * 3
    x = torch.cat([c + spread * torch.randn(n, dim, generator=gen) for c, n in zip(centres, sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    return x, y


def test_cluster_retrieval_keeps_the_curated_clusters():
    x, y = blobs([200, 150, 100, 50])
    picked, _ = cu.retrieve_clusters(x[[210, 390]] + 0.01, x, 4, seed=0, use_faiss=False)
    assert set(y[picked].tolist()) == {1, 2} and len(picked) == 250
    picked, _ = cu.retrieve_clusters(x[[210]], x, 4, per_cluster=30, seed=0, use_faiss=False)
    assert len(picked) == 30 and (y[picked] == 1).all()


def test_kmeans_finds_separated_blobs():
    x, y = blobs([100, 60, 30])
    for metric in ("cosine", "l2"):
        c, labels = cu.kmeans(x, 3, seed=1, metric=metric, use_faiss=False)
        assert c.shape == (3, 16)
        mapping = {tuple(sorted(set(labels[y == k].tolist()))) for k in range(3)}
        assert len(mapping) == 3 and all(len(m) == 1 for m in mapping)


def test_even_split_is_water_filling():
    rng = np.random.default_rng(0)
    # the cap is 13 (13 + 3 + 13 + 10 = 39), one more from a cluster larger than 13
    assert cu.even_split(np.array([100, 3, 50, 10]), 40, rng).tolist() in ([14, 3, 13, 10], [13, 3, 14, 10])
    take = cu.even_split(np.array([100, 3, 50, 10]), 40, np.random.default_rng(1))
    assert take.sum() == 40 and take[1] == 3 and take[3] == 10 and abs(int(take[0]) - int(take[2])) <= 1
    assert cu.even_split(np.array([4, 5]), 100, rng).tolist() == [4, 5]


def test_balanced_sampling_evens_out_unequal_clusters():
    sizes = [3000, 1200, 500, 200, 80, 40, 25, 20]
    x, y = blobs(sizes, dim=16, spread=0.2, seed=2)
    h = cu.hierarchical_kmeans(x, [40, 16, 8], resample_steps=3, seed=0, use_faiss=False)
    assert [len(a) for a in h.labels] == [len(x), 40, 16] and h.point_labels(3).max() < 8
    n = 240
    picked = cu.balanced_sample(h.labels, n, seed=0)
    assert len(picked) == n and len(np.unique(picked)) == n
    counts = np.bincount(y[picked], minlength=8)
    rand = np.random.default_rng(0).choice(len(x), n, replace=False)
    balanced, random = cu.entropy(y[picked]), cu.entropy(y[rand])
    assert balanced > random + 0.5 and balanced > 0.95 * np.log(8), (counts, balanced, random)
    assert counts.min() >= 15 and counts.max() <= 45  # near even: the smallest blobs are nearly all taken
    assert cu.balanced_sample(h.labels, 10**6).tolist() == list(range(len(x)))


@pytest.mark.parametrize("use_faiss", [False, pytest.param(True, marks=pytest.mark.skipif(
    not cu.have_faiss(), reason="faiss is not installed"))])
def test_resampling_moves_centroids_from_dense_to_sparse_regions(use_faiss):
    """Vo et al.'s 1-D picture: 90 % of the points in [0, 1), 10 % over [1, 10). Plain k-means spends most of
    its centroids where the points are dense; freshly seeded k-means on the points nearest each centroid spreads
    them out (a warm start from the current centroids would leave them where they are)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(9000, 1, generator=g), 1 + 9 * torch.rand(1000, 1, generator=g)])
    for seed in range(3):
        sparse = [float((cu.hierarchical_kmeans(x, [20], resample_steps=steps, seed=seed, metric="l2",
                                                use_faiss=use_faiss).centroids[0] >= 1).float().mean())
                  for steps in (0, 10)]
        assert sparse[1] >= sparse[0] + 0.1, (seed, sparse)


def test_bad_library_inputs_are_user_errors():
    from selfsup.errors import UserError

    with pytest.raises(UserError, match="decreasing"):
        cu.hierarchical_kmeans(torch.randn(10, 3), [2, 5])
    with pytest.raises(UserError, match="k=20"):
        cu.kmeans(torch.randn(10, 3), 20)
    with pytest.raises(UserError, match="expected embeddings"):
        cu.knn(torch.randn(3), torch.randn(4, 3), 1)


@pytest.mark.skipif(not cu.have_faiss(), reason="faiss is not installed")
def test_faiss_and_torch_agree():
    x, y = blobs([120, 80, 40], dim=24, spread=0.2, seed=3)
    q = x[::7] + 0.01
    s_f, i_f = cu.knn(q, x, 5, use_faiss=True)
    s_t, i_t = cu.knn(q, x, 5, use_faiss=False)
    torch.testing.assert_close(s_f, s_t, atol=1e-4, rtol=1e-4)
    assert (i_f == i_t).float().mean() > 0.99
    _, lf = cu.kmeans(x, 3, seed=0, use_faiss=True)
    _, lt = cu.kmeans(x, 3, seed=0, use_faiss=False)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(lf, lt) == 1.0 and adjusted_rand_score(lf, y) == 1.0
    hf = cu.hierarchical_kmeans(x, [9, 3], seed=0, use_faiss=True)
    assert adjusted_rand_score(hf.point_labels(2), y) == 1.0


# --- the command, end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny random-init ViT (1 block, 32 px input, 8 px patches) exported as selfsup does after training."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.backbone.arch, cfg.backbone.depth, cfg.backbone.patch_size, cfg.backbone.img_size = "vit_tiny", 1, 8, 32
    cfg.crops.global_size = 32
    path = tmp_path_factory.mktemp("run") / "backbone.safetensors"
    save_backbone(backbone_from_config(cfg.backbone, drop_path=0.0), cfg, path)
    return path


def picture(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A distinct image: a random colour gradient with a few random rectangles."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = rng.uniform(0, 255, (3, 3))
    img = a[:, 0, None, None] + a[:, 1, None, None] * xx + a[:, 2, None, None] * yy
    img = np.clip(img, 0, 255).transpose(1, 2, 0)
    for _ in range(3):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(4, 12, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
    return img.astype(np.uint8)


def jpeg(a: np.ndarray, quality: int = 70) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pile(tmp_path_factory):
    """A pool of 40 distinct PNGs, 4 exact copies and 4 JPEG re-encodes of some of them, and 2 copies of
    images of a protected evaluation folder."""
    root = tmp_path_factory.mktemp("pile")
    rng = np.random.default_rng(0)
    pool, ev = root / "pool", root / "eval"
    pool.mkdir(), ev.mkdir()
    images = [picture(rng) for _ in range(40)]
    for i, a in enumerate(images):
        Image.fromarray(a).save(pool / f"img{i:02d}.png")
    for i in range(4):
        (pool / f"zcopy{i}.png").write_bytes((pool / f"img{i:02d}.png").read_bytes())
        (pool / f"zjpeg{i}.jpg").write_bytes(jpeg(images[10 + i]))
    evals = [picture(rng) for _ in range(5)]
    for i, a in enumerate(evals):
        Image.fromarray(a).save(ev / f"eval{i}.png")
    Image.fromarray(evals[0]).save(pool / "zeval0.png")
    (pool / "zeval1.jpg").write_bytes(jpeg(evals[1], 80))
    curated = root / "curated"
    curated.mkdir()
    for i in (20, 30):  # slightly shifted versions of two pool images
        Image.fromarray(np.clip(images[i].astype(int) + 6, 0, 255).astype(np.uint8)).save(curated / f"c{i}.png")
    return root


def test_curate_end_to_end(tmp_path, export, pile, capsys):
    out, shards = tmp_path / "out", tmp_path / "shards"
    pool = str(pile / "pool")
    args = ["curate", "--checkpoint", str(export), "--pool", pool, "--protect", str(pile / "eval"), "--dedup",
            "--dedup-threshold", "0.94", "--protect-threshold", "0.85", "--out", str(out), "--shards", str(shards),
            "--no-cache", "--balance", "30", "--levels", "8,3", "--json"]
    assert main([*args[:-1], "--dedup-crops", "0.9", "--out", str(tmp_path / "crops"), "--shards",
                 str(tmp_path / "s2")]) == 0  # crop views: at least the copies found without them
    crop_removed = (tmp_path / "crops" / "removed.tsv").read_text()
    assert all(f"zcopy{i}.png" in crop_removed for i in range(4))
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    selected = (out / "selected.txt").read_text().splitlines()
    removed = (out / "removed.tsv").read_text().splitlines()[1:]
    why = {line.split("\t")[0].rsplit("/", 1)[-1]: line.split("\t")[1] for line in removed}
    dups = {f"zcopy{i}.png" for i in range(4)} | {f"zjpeg{i}.jpg" for i in range(4)}
    assert dups <= set(why) and all(why[d] == "duplicate" for d in dups)
    assert why["zeval0.png"].startswith("copy of protected") and why["zeval1.jpg"].startswith("copy of protected")
    assert set(why) == dups | {"zeval0.png", "zeval1.jpg"}  # nothing else: the 40 distinct images stay
    assert len(selected) == 30 and len(set(selected)) == 30 and all(s.startswith(pool) for s in selected)
    assert not {s.rsplit("/", 1)[-1] for s in selected} & set(why)
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["pool"]["images"] == 50 and steps["dedup"]["removed"] == 8 and steps["protect"]["removed"] == 2
    assert steps["balance"]["left"] == 30 and json.loads((out / "curation.json").read_text()) == summary
    assert {"dedup_groups.png", "clusters.png"} <= {p.name for p in out.glob("*.png")}
    tars = sorted(shards.glob("*.tar"))
    with tarfile.open(tars[0]) as tar:
        members = [m.name for m in tar.getmembers()]
    assert summary["shards"]["images"] == 30 and len(members) == 30
    assert main(["curate", "--checkpoint", str(export), "--pool", summary["shards"]["spec"], "--out",
                 str(tmp_path / "again"), "--no-cache"]) == 0  # the shards read back as a pool
    assert len((tmp_path / "again" / "selected.txt").read_text().splitlines()) == 30


def test_curate_retrieval_per_query_and_clusters(tmp_path, export, pile):
    pool = str(pile / "pool")
    base = ["curate", "--checkpoint", str(export), "--pool", pool, "--curated", str(pile / "curated")]
    assert main([*base, "--per-query", "3", "--out", str(tmp_path / "q"), "--union"]) == 0
    selected = (tmp_path / "q" / "selected.txt").read_text().splitlines()
    names = [s.rsplit("/", 1)[-1] for s in selected]
    assert "img20.png" in names and "img30.png" in names and "c20.png" in names
    assert len(selected) <= 2 * 3 + 2 and (tmp_path / "q" / "retrieved.png").exists()
    assert main([*base, "--clusters", "5", "--out", str(tmp_path / "c")]) == 0
    names = [s.rsplit("/", 1)[-1] for s in (tmp_path / "c" / "selected.txt").read_text().splitlines()]
    assert "img20.png" in names and "img30.png" in names and len(names) < 50
    steps = json.loads((tmp_path / "c" / "curation.json").read_text())["steps"]
    assert steps[-1]["mode"] == "clusters" and steps[-1]["left"] == len(names)


def test_curate_builtin_pool_names_and_bad_inputs(tmp_path, export, capsys):
    out = tmp_path / "m"
    assert main(["curate", "--checkpoint", str(export), "--pool", "digits", "--balance", "50", "--out", str(out),
                 "--no-cache", "--shards", str(tmp_path / "s")]) == 0
    lines = (out / "selected.txt").read_text().splitlines()
    assert len(lines) == 50 and all(s.startswith("digits#") for s in lines)
    with tarfile.open(tmp_path / "s" / "000000.tar") as tar:  # built-in images are written as PNG, with labels
        names = sorted(m.name for m in tar.getmembers())
        labels = [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    assert len(names) == 100 and names[0].endswith(".cls") and names[1].endswith(".png")
    from selfsup.data.builtin import open_source

    want = open_source("digits").labels()[[int(s.split("#")[1]) for s in lines]]
    assert sorted(labels) == sorted(want.tolist())
    assert (tmp_path / "s" / "classes.txt").read_text().split() == [str(d) for d in range(10)]
    capsys.readouterr()
    bad = [
        (["--pool", "digits", "--per-query", "4"], "give --curated"),
        (["--pool", "digits", "--curated", "digits"], "--per-query K or --clusters N"),
        (["--pool", "digits", "--dedup", "--dedup-threshold", "1.5"], "expected a cosine similarity"),
        (["--pool", "digits", "--balance", "0"], "--balance 0: expected at least 1"),
        (["--pool", "digits", "--dedup", "--dedup-crops", "0.9,1.2"], "expected distinct area fractions"),
        (["--pool", "digits", "--dedup-crops", "0.9"], "give one of them"),
        (["--pool", "digits", "--dedup", "--dedup-grid", "3"], "give --dedup-crops AREAS"),
        (["--pool", "digits", "--dedup", "--dedup-crops", "0.9", "--dedup-grid", "1"], "at least 2 positions"),
        (["--pool", "digits", "--balance", "10", "--levels", "3,8"], "decreasing"),
        (["--pool", str(tmp_path / "missing")], "no such file or directory"),
    ]
    for extra, message in bad:
        assert main(["curate", "--checkpoint", str(export), *extra, "--out", str(tmp_path / "x"), "--no-cache"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("source_kind", ["folder", "tensors"])
def test_an_interrupted_embedding_resumes_after_its_saved_rows(tmp_path, pile, source_kind):
    """A pool's embedding stopped part-way goes on from the rows it saved: the features equal one uninterrupted
    pass, only the rest is computed, and the partial file is gone at the end."""
    from selfsup.data.builtin import open_source
    from selfsup.eval.features import extract

    source = open_source(str(pile / "pool")) if source_kind == "folder" else open_source("digits", "test")
    net = backbone_from_config(Config().backbone.__class__(arch="vit_tiny", patch_size=4, depth=1, img_size=16))
    net.eval()
    seen = []

    def forward(x, stop_after=None):
        seen.append(len(x))
        if stop_after is not None and sum(seen) > stop_after:
            raise KeyboardInterrupt
        o = net.forward_features(x)
        return {"cls": o["x_norm_clstoken"], "gem": o["x_norm_patchtokens"].mean(1)}

    whole, labels = extract(forward, source, 16, batch=4)
    partial = tmp_path / "pool.partial.safetensors"
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        extract(lambda x: forward(x, stop_after=14), source, 16, batch=4, resume=partial, save_every=8)
    assert partial.exists()
    seen.clear()
    again, labels_again = extract(forward, source, 16, batch=4, resume=partial, save_every=8)
    assert sum(seen) == len(source) - 8  # 3 batches of 4 done, rows 0-7 saved (every 8 images): the rest computed
    assert all(torch.equal(again[k], whole[k]) for k in whole) and torch.equal(labels_again, labels)
    assert not partial.exists()
