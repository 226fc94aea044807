"""Copy detection as DINO evaluates it on Copydays "strong": descriptors are [CLS] concatenated with GeM (p = 4)
of the patch tokens, centred and PCA-whitened with statistics of separate images, L2-normalised, and ranked by
cosine similarity; each query has one original in the database (which may hold distractors). mAP uses the
Holidays/Copydays trapezoidal AP; recall@1 is the fraction of queries whose nearest database image is theirs.

`distort` makes strong Copydays-like attacked copies of an image for building such queries."""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from ..core.errors import UserError
from ..data.builtin import open_source
from ..data.channels import to_uint8
from ..data.sources import Source
from ..nn.vit import require_vit
from .features import extract


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random crop keeping 30-80 % of the area, rescaled to the original size."""
    w, h = img.size
    area = rng.uniform(0.3, 0.8) * w * h
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = int(np.clip(round(np.sqrt(area * aspect)), 1, w))
    ch = int(np.clip(round(np.sqrt(area / aspect)), 1, h))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)


def _rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotation by up to 30 degrees either way, corners filled black."""
    return img.rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR, expand=False)


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur with a radius of 0.5-2 % of the image's larger side (at least half a pixel)."""
    return img.filter(ImageFilter.GaussianBlur(max(0.5, rng.uniform(0.005, 0.02) * max(img.size))))


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """JPEG re-encoding in memory at quality 10-50."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(rng.integers(10, 51)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation factors in 0.5-1.5 and a hue shift of up to a quarter turn."""
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(0.5, 1.5)))
    shift = int(rng.integers(-64, 65))
    hue, saturation, value = img.convert("HSV").split()
    return Image.merge("HSV", (hue.point(lambda v: (v + shift) % 256), saturation, value)).convert("RGB")


def _text(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One to three random strings in the default font, in random colours and places."""
    img = img.copy()
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, img.size[1] // 6))
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "))
    for _ in range(int(rng.integers(1, 4))):
        words = "".join(rng.choice(letters, int(rng.integers(4, 12))))
        xy = (int(rng.integers(0, img.size[0])) - img.size[0] // 4, int(rng.integers(0, img.size[1])))
        draw.text(xy, words, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), font=font)
    return img


def _patches(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One to four pasted rectangles of flat colour or noise, each up to a third of the image's sides."""
    img = img.copy()
    w, h = img.size
    for _ in range(int(rng.integers(1, 5))):
        pw = int(rng.integers(1, max(2, w // 3 + 1)))
        ph = int(rng.integers(1, max(2, h // 3 + 1)))
        if rng.random() < 0.5:
            content = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (ph, pw, 3))
        else:
            content = rng.integers(0, 256, (ph, pw, 3), dtype=np.uint8)
        img.paste(Image.fromarray(np.ascontiguousarray(content)),
                  (int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))))
    return img


def _print_scan(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Print-and-scan-like: contrast loss towards grey, slight blur, additive Gaussian noise."""
    x = np.asarray(img, dtype=np.float64)
    x = x.mean() + rng.uniform(0.6, 0.85) * (x - x.mean())
    x = np.asarray(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8))), dtype=np.float64)
    x = x + rng.normal(0, rng.uniform(4, 12), x.shape)
    return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))


# in the order they are applied: geometry, colour, overlays, then degradations, JPEG last
_DISTORTIONS: tuple[Callable[[Image.Image, np.random.Generator], Image.Image], ...] = (
    _crop, _rotate, _colour, _text, _patches, _blur, _print_scan, _jpeg)


def distort(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A strongly attacked copy of a uint8 image [3, H, W], same shape and dtype: a random subset of at least three
    of crop, rotation, colour change, pasted text, pasted rectangles, blur, print-and-scan noise and JPEG, in the
    spirit of Copydays "strong". Deterministic given the state of `rng`."""
    if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3 or min(img.shape[1:]) < 4:
        raise UserError(f"distort needs a uint8 image [3, H, W] with H, W >= 4, got {img.dtype} "
                        f"{tuple(img.shape)}")
    n = int(rng.integers(3, len(_DISTORTIONS) + 1))
    chosen = sorted(rng.choice(len(_DISTORTIONS), n, replace=False))
    pil = Image.fromarray(img.permute(1, 2, 0).cpu().numpy())
    for i in chosen:
        pil = _DISTORTIONS[i](pil, rng)
    return torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous().to(img.device)


def gem(patch: torch.Tensor, p: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling of patch tokens [N, L, D] -> [N, D]: mean(clamp(x, eps)^p)^(1/p)
    (dino eval_copy_detection.py, p = 4)."""
    if patch.dim() != 3 or patch.shape[1] < 1 or p <= 0 or eps <= 0:
        raise UserError(f"gem needs patch tokens [N, L, D] with L >= 1, p > 0 and eps > 0, got "
                        f"{tuple(patch.shape)}, p={p}, eps={eps}")
    return patch.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def descriptor(cls: torch.Tensor, patch: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """[CLS] [N, D] concatenated with GeM of the patch tokens [N, L, D] -> [N, 2D], both raw: the reference
    normalises only after whitening (dino eval_copy_detection.py)."""
    if cls.dim() != 2 or patch.dim() != 3 or cls.shape[0] != patch.shape[0] or cls.shape[1] != patch.shape[2]:
        raise UserError(f"descriptor needs [CLS] [N, D] and patch tokens [N, L, D], got {tuple(cls.shape)} and "
                        f"{tuple(patch.shape)}")
    return torch.cat([cls, gem(patch, p)], dim=1)


class Whitening:
    """Centring and PCA whitening learnt on separate images, then L2 normalisation (dino eval_copy_detection.py
    with utils.PCA(whit=0.5)): eigenvalues below 1e-5 of the largest are raised to it, components are sorted by
    decreasing eigenvalue and the first `dim` kept (all by default), each divided by sqrt(eigenvalue)."""

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and dim < 1:
            raise UserError(f"Whitening dim must be a positive integer or None, got {dim}")
        self.dim = dim
        self.mean: torch.Tensor | None = None
        self.projection: torch.Tensor | None = None  # [D, dim]

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> Whitening:
        """Learn mean and whitening projection from descriptors [N, D]."""
        if x.dim() != 2 or x.shape[0] < 2:
            raise UserError(f"Whitening.fit needs descriptors [N, D] with N >= 2, got {tuple(x.shape)}")
        if self.dim is not None and self.dim > x.shape[1]:
            raise UserError(f"Whitening dim={self.dim} exceeds the descriptor size {x.shape[1]}")
        x64 = x.double()
        self.mean = x64.mean(dim=0)
        centred = x64 - self.mean
        # covariance of the centred data; the reference takes x.T @ x of the uncentred data here (see report)
        eigval, eigvec = torch.linalg.eigh(centred.T @ centred / x.shape[0])
        eigval = eigval.clamp(min=float(eigval.max()) * 1e-5)
        order = eigval.argsort(descending=True)[:self.dim]
        self.projection = eigvec[:, order] / eigval[order].sqrt()
        return self

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Centred and whitened descriptors [N, dim], not normalised."""
        if self.projection is None or self.mean is None:
            raise UserError("Whitening must be fitted before use: call fit(descriptors) first")
        if x.dim() != 2 or x.shape[1] != self.mean.shape[0]:
            raise UserError(f"Whitening was fitted on descriptors of size {self.mean.shape[0]}, got "
                            f"{tuple(x.shape)}")
        return ((x.double() - self.mean.to(x.device)) @ self.projection.to(x.device)).to(torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Centred, whitened and L2-normalised descriptors [N, dim]."""
        return F.normalize(self.project(x), dim=1)


def average_precision(ranked_relevant: torch.Tensor, n_relevant: int | None = None) -> float:
    """AP of one ranked list (bool [R], True where relevant) by the Holidays/Copydays trapezoidal rule that
    dino eval_copy_detection.py uses (score_ap_from_ranks_1): a single relevant item at 1-based rank r scores 1 if
    r = 1, else 1 / (2r). `n_relevant` counts relevant items missing from a truncated list (default: none)."""
    if ranked_relevant.dim() != 1:
        raise UserError(f"average_precision needs a 1-D relevance vector, got shape {tuple(ranked_relevant.shape)}")
    ranks = torch.nonzero(ranked_relevant).flatten().double()  # 0-based ranks of the hits
    total = len(ranks) if n_relevant is None else n_relevant
    if total < max(1, len(ranks)):
        raise UserError(f"n_relevant must be at least 1 and at least the {len(ranks)} hits listed, got {total}")
    hits = torch.arange(len(ranks), dtype=torch.float64)
    before = torch.where(ranks == 0, torch.ones_like(ranks), hits / ranks.clamp(min=1))  # precision left of a hit
    after = (hits + 1) / (ranks + 1)  # precision including it
    return float(((before + after) / 2).sum() / total)


@torch.no_grad()
def copy_map(queries: torch.Tensor, database: torch.Tensor, query_to_db: torch.Tensor, top: int = 20) -> dict:
    """Rank the database [M, D] by cosine similarity for each query [Q, D]; query i's only relevant image is
    database[query_to_db[i]], other database images are originals of other queries or distractors. As the
    reference, only the first `top` ranks are scored (a copy found lower scores AP 0). Returns {"map",
    "recall1"} in percent, and the numbers of "queries" and "database" images."""
    if (queries.dim() != 2 or database.dim() != 2 or queries.shape[1] != database.shape[1] or len(queries) < 1
            or len(database) < 1):
        raise UserError(f"copy_map needs non-empty queries [Q, D] and database [M, D], got "
                        f"{tuple(queries.shape)} and {tuple(database.shape)}")
    target = query_to_db.long().flatten()
    if len(target) != len(queries) or target.min() < 0 or target.max() >= len(database):
        raise UserError(f"query_to_db must give, for each of the {len(queries)} queries, a database index in "
                        f"0..{len(database) - 1}")
    if top < 1:
        raise UserError(f"top must be a positive integer, got {top}")
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(database.float(), dim=1).T
    ranked = similarity.topk(min(top, len(database)), dim=1).indices  # [Q, top], best first
    relevant = ranked == target[:, None].to(ranked.device)
    aps = [average_precision(row, n_relevant=1) for row in relevant]
    return {"map": 100 * float(np.mean(aps)), "recall1": 100 * float(relevant[:, 0].float().mean()),
            "queries": len(queries), "database": len(database)}


class Copies(Source):
    """Distorted copies of some images of a source, made when read: copy i is `distort(source[picks[i]])` with its
    own generator (seed, i), so a copy is the same whichever process reads it."""

    def __init__(self, source: Source, picks: list[int], seed: int):
        self.source, self.picks, self.seed = source, picks, seed
        self.name, self.files = f"{source.name}:copies-{len(picks)}-seed{seed}", None
        self.generator = getattr(source, "generator", None)

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return distort(to_uint8(self.source[self.picks[i]][0]), np.random.default_rng([self.seed, i])), self.picks[i]


def copy_detection(loaded, spec: str, size: int, n_queries: int, seed: int, device, cache) -> dict:
    """DINO's copy-detection protocol on any source: the test split is the database (the originals of the copies
    among distractors), `n_queries` of its images (evenly spread) get a distorted copy, the train split (at most
    WHITENING images) learns the whitening."""
    vit = require_vit(loaded.backbone, "copy detection").to(device).eval()
    database, train = open_source(spec, "test"), open_source(spec, "train")
    n = min(n_queries, len(database))
    picks = [round(i * (len(database) - 1) / max(n - 1, 1)) for i in range(n)]
    sets = {"database": database, "queries": Copies(database, picks, seed),
            "whitening": Picked(train, WHITENING)}

    def forward(x: torch.Tensor) -> torch.Tensor:
        patch, cls = vit.get_intermediate_layers(x, n=1, return_class_token=True)[0]
        return descriptor(cls, patch)

    desc = {}
    for name, source in sets.items():
        compute = lambda s=source, name=name: extract(  # noqa: E731
            lambda x: {"descriptor": forward(x)}, s, size, device, mean=loaded.mean, std=loaded.std,
            desc=f"copy-detection descriptors {spec}:{name}")
        feats, labels = cache.get(spec, f"copydetect-{name}", source, compute, size=size, mean=list(loaded.mean),
                                  std=list(loaded.std))
        desc[name] = (feats["descriptor"], labels)
    whiten = Whitening().fit(desc["whitening"][0])
    return copy_map(whiten(desc["queries"][0]), whiten(desc["database"][0]), desc["queries"][1])


WHITENING = 2000  # images of the train split that learn the whitening (DINO uses 20k distractor images)


class Picked(Source):
    """At most n images of a source, evenly spread."""

    def __init__(self, source: Source, n: int):
        self.source = source
        self.index = torch.linspace(0, len(source) - 1, min(n, len(source))).round().long().tolist()
        files = getattr(source, "files", None)
        self.name, self.files = f"{source.name}:{len(self.index)}", None if files is None else [files[i] for i in self.index]
        self.generator = getattr(source, "generator", None)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.source[self.index[i]]
