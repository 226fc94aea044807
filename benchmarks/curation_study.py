"""Issue 15's acceptance study, in miniature: an imbalanced, redundant pool from Fashion-MNIST, a curated set of
three rare classes and an evaluation set to protect; then the figures of a `selfsup curate` output against the
ground truth.

    python benchmarks/curation_study.py build --out /tmp/cur          # pool/, curated/, evalset/, truth.json
    python benchmarks/curation_study.py build --out /tmp/cal --seed 1 # a calibration pool, made alike
    selfsup train --config dino_mnist5k --data /tmp/cur/pool --time 12m --out /tmp/dino   # the backbone
    selfsup curate --checkpoint /tmp/dino --pool /tmp/cal/pool --dedup --dedup-threshold T \
        --dedup-crops 0.95,0.9,0.85,0.8 --dedup-grid 3 --protect /tmp/cal/evalset/test \
        --protect-threshold 0.78 --out /tmp/cal/dedup-T
    python benchmarks/curation_study.py score --out /tmp/cal          # precision and recall of each T
    ... then on /tmp/cur with the chosen T (the same flags): dedup-T/; with --curated /tmp/cur/curated
    --per-query 4, retrieve/; with --balance 2000 --seed S, balance-sS/ (S = 0 .. 4), and with the dedup and
    protect flags too, balance-dedup/
    python benchmarks/curation_study.py random --out /tmp/cur       # random-sS/: 2,000 at random, S = 0 .. 4
    python benchmarks/curation_study.py score --out /tmp/cur

Fashion-MNIST comes from `apt-get install dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist). `score`
writes benchmarks/results/curation_study_<folder name>.json.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
HEAD, ALPHA = 3000, 1.2  # the pool: n_c = HEAD * rank^-ALPHA images of the class of rank c (1-based)
N_COPIES, N_EVAL_COPIES = 400, 100  # near-duplicates of pool images; copies of evaluation images put in the pool
CURATED_CLASSES, N_CURATED = (5, 8, 9), 50  # the curated set: 50 images of each of three of the rarest classes
LOOK_ALIKE = 0.1  # RMS: originals this close are one image twice (a cropped copy lies at a median 0.17)
RESULTS = Path(__file__).parent / "results"


def read_idx(name: str) -> np.ndarray:
    with gzip.open(FASHION / name) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def distort(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A near-duplicate: a crop of 80-95 % of the area resized back, JPEG at quality 20-60, a brightness and
    contrast shift of up to 20 %, or two of them."""
    kinds = rng.choice(["crop", "jpeg", "colour"], size=int(rng.integers(1, 3)), replace=False)
    im = Image.fromarray(img)
    for kind in kinds:
        if kind == "crop":
            side = int(round(28 * math.sqrt(rng.uniform(0.8, 0.95))))
            x, y = (int(rng.integers(0, 28 - side + 1)) for _ in range(2))
            im = im.crop((x, y, x + side, y + side)).resize((28, 28), Image.BICUBIC)
        elif kind == "jpeg":
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=int(rng.integers(20, 61)))
            im = Image.open(io.BytesIO(buf.getvalue())).convert("L")
        else:
            a = np.asarray(im, np.float32)
            a = (a - a.mean()) * rng.uniform(0.8, 1.2) + a.mean() * rng.uniform(0.8, 1.2)
            im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return np.asarray(im), "+".join(sorted(kinds))


def distinct(x: np.ndarray, ids: np.ndarray, n: int) -> list[int]:
    """The first n of ids whose images lie farther than LOOK_ALIKE (RMS, pixels in 0..1) from every one taken
    before: Fashion-MNIST holds look-alikes closer to each other than an injected copy is to its source, and the
    truth must not count them as distinct images."""
    cand = ids[: 2 * n]
    f = x[cand].reshape(len(cand), -1).astype(np.float32) / 255
    sq = (f * f).sum(1)
    rms = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * f @ f.T, 0) / f.shape[1])
    taken: list[int] = []
    for k in range(len(cand)):
        if len(taken) == n:
            break
        if not taken or rms[k, taken].min() > LOOK_ALIKE:
            taken.append(k)
    return [int(cand[k]) for k in taken]


def build(out: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x, y = read_idx("train-images-idx3-ubyte.gz"), read_idx("train-labels-idx1-ubyte.gz")
    xt, yt = read_idx("t10k-images-idx3-ubyte.gz"), read_idx("t10k-labels-idx1-ubyte.gz")
    order = [0, 2, 4, 6, 1, 3, 7, 5, 8, 9]  # class of rank 1, 2, ...: the curated classes are among the rarest
    by_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in range(10)}
    truth: dict[str, dict] = {}

    def save(folder: Path, name: str, img: np.ndarray) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / name)
        return str(folder / name)

    pool = []
    for rank, c in enumerate(order, 1):
        for i in distinct(x, by_class[c], round(HEAD * rank ** -ALPHA)):
            pool.append(save(out / "pool", f"{i:05d}.png", x[i]))
            truth[pool[-1]] = {"class": int(c)}
    for k, src in enumerate(rng.choice(pool, N_COPIES, replace=False)):  # near-duplicates within the pool
        img, how = distort(np.asarray(Image.open(src)), rng)
        name = save(out / "pool", f"copy{k:04d}.png", img)
        truth[name] = {"class": truth[src]["class"], "copy_of": src, "how": how}
    # the evaluation set (protected): 100 train / 200 test images per class from Fashion-MNIST's test split
    test_ids = {c: rng.permutation(np.flatnonzero(yt == c)) for c in range(10)}
    evaluation = []
    for c in range(10):
        for split, ids in (("train", test_ids[c][:100]), ("test", test_ids[c][100:300])):
            for i in ids:
                path = save(out / "evalset" / split / CLASSES[c], f"t{i:05d}.png", xt[i])
                if split == "test":
                    evaluation.append(path)
    for k, src in enumerate(rng.choice(evaluation, N_EVAL_COPIES, replace=False)):  # leaks of the test images
        img, how = distort(np.asarray(Image.open(src)), rng)
        name = save(out / "pool", f"leak{k:04d}.png", img)
        truth[name] = {"class": CLASSES.index(Path(src).parent.name), "copy_of_eval": src, "how": how}
    for c in CURATED_CLASSES:  # train images outside the pool
        for i in by_class[c][-N_CURATED:]:
            save(out / "curated" / CLASSES[c], f"c{i:05d}.png", x[i])
    (out / "truth.json").write_text(json.dumps(truth))
    counts = Counter(t["class"] for t in truth.values())
    print(f"pool: {len(truth)} images ({len(pool)} originals, {N_COPIES} near-duplicates, {N_EVAL_COPIES} copies "
          f"of test images); per class {dict(sorted(counts.items()))}")


def dedup_scores(removed: set[str], truth: dict) -> dict:
    """Recall: injected near-duplicate pairs with one of the two removed. Precision: removed images that are
    part of an injected pair (an original or its copy)."""
    pairs = [(k, t["copy_of"]) for k, t in truth.items() if "copy_of" in t]
    found = sum(a in removed or b in removed for a, b in pairs)
    involved = {p for pair in pairs for p in pair}
    within = {r for r in removed if "copy_of_eval" not in truth.get(r, {})}
    return {"recall": 100 * found / len(pairs), "precision": 100 * len(within & involved) / max(len(within), 1),
            "removed": len(within), "pairs": len(pairs)}


def entropy(classes: list[int]) -> float:
    p = np.bincount(classes, minlength=10) / max(len(classes), 1)
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def random_samples(out: Path, n: int = 2000, seeds: int = 5) -> None:
    """random-sS/selected.txt: n pool images drawn by numpy's default_rng(S), the baseline of balanced sampling."""
    names = sorted(json.loads((out / "truth.json").read_text()))
    for seed in range(seeds):
        pick = np.random.default_rng(seed).choice(len(names), n, replace=False)
        (out / f"random-s{seed}").mkdir(exist_ok=True)
        (out / f"random-s{seed}" / "selected.txt").write_text("".join(names[i] + "\n" for i in sorted(pick)))


def score(out: Path) -> dict:
    truth = json.loads((out / "truth.json").read_text())
    result: dict = {"pool": len(truth), "pool_entropy": entropy([t["class"] for t in truth.values()])}
    for dedup in sorted(d for d in out.glob("dedup*") if d.is_dir()):  # dedup/, or dedup-0.9/ ... over a calibration pool
        # removed.tsv says why each image went: de-duplication is scored on its own removals, protection on its own
        rows = [line.split("\t") for line in (dedup / "removed.tsv").read_text().splitlines()[1:]]
        duplicates = {r[0] for r in rows if r[1] == "duplicate"}
        protected = {r[0] for r in rows if r[1] != "duplicate"}
        leaks = [k for k, t in truth.items() if "copy_of_eval" in t]
        result[dedup.name] = {**dedup_scores(duplicates, truth),
                              "protected_copies_removed": f"{sum(k in protected for k in leaks)} of {len(leaks)}",
                              # a copy of a test image may go earlier, as a near-duplicate of a pool image
                              "eval_copies_removed_any_step": f"{len(set(leaks) & (protected | duplicates))} of {len(leaks)}",
                              "protect_others_removed": len(protected - set(leaks))}
    share = lambda names: 100 * np.mean([truth[n]["class"] in CURATED_CLASSES for n in names])  # noqa: E731
    result["curated_share_pool"] = float(share(list(truth)))
    for sel in sorted(out.glob("*/selected.txt")):  # retrieve/, balance/ (and variants such as balance-default/), random/
        name = sel.parent.name
        if not name.startswith("dedup"):
            names = [n for n in sel.read_text().split() if n in truth]
            classes = [truth[n]["class"] for n in names]
            result[name] = {"n": len(names), "curated_share": float(share(names)), "entropy": entropy(classes),
                            "per_class": np.bincount(classes, minlength=10).tolist()}
    seeds: dict[str, list[float]] = {}  # balance-s0, balance-s1, ...: one kind of selection at several seeds
    for name, r in result.items():
        if (kind := re.fullmatch(r"(.+)-s\d+", name)) and isinstance(r, dict):
            seeds.setdefault(kind[1], []).append(r["entropy"])
    for kind, ents in sorted(seeds.items()):
        result[f"{kind}_entropy_over_seeds"] = {"mean": float(np.mean(ents)), "sd": float(np.std(ents)),
                                                "seeds": len(ents)}
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"curation_study_{out.name}.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("build", "random", "score"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    {"build": lambda: build(args.out, args.seed), "random": lambda: random_samples(args.out),
     "score": lambda: score(args.out)}[args.step]()


if __name__ == "__main__":
    main()
