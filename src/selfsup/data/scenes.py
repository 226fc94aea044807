"""`--data scenes` and `--data scenes-video`: procedurally generated scenes with masks and depth, offline.

A scene is a main object, near and towards the middle, and up to two farther ones, in front of a textured,
low-contrast background that recedes. Each object has a class, a
depth that decides occlusion and its size (radius ~ 1 / depth), and a fill that does not give its class away
(shapes are filled with random colours and textures; the photo objects keep their pixels). The background is
smoothed noise, a gradient with grain or a photo texture, with clutter (small strokes) drawn into it. Every
pixel has a class (0 = background), an instance id and a depth in metres.

Everything is a function of (split, index): the same seed gives the same scene on any machine, and train and
test draw from disjoint seed streams. `scenes-video` moves the objects of a scene over a static background
(DAVIS-style sequences: an instance mask per frame, objects occluding each other as they pass).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dense import DenseItem, DenseSource, VideoSequence, VideoSource
from .packaged import mnist5k, skimage_dir, split_tensor

SIZE = 64  # pixels: an 8 x 8 grid of patch 8, a CPU trains it in minutes
N_SPLIT = {"train": 2000, "test": 500}
N_VIDEOS, N_FRAMES = 16, 12
VIDEO_SIZE = 128  # pixels: video frames are twice the training size, as DINO reads DAVIS at 480p for 224-px models
CLASSES = ("background", "disc", "square", "triangle", "star", "digit", "horse", "cat", "coffee", "face")
SHAPES = ("disc", "square", "triangle", "star")
PHOTOS = {"cat": ("chelsea.png", (100, 0, 350, 250)), "coffee": ("coffee.png", (110, 10, 490, 370)),
          "face": ("astronaut.png", (150, 20, 330, 220))}  # file, crop box around the object
TEXTURES = ("brick.png", "grass.png", "gravel.png", "moon.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg")
DEPTH_OBJECTS = (1.3, 5.0)  # metres: near and far limits of an object
DEPTH_MAIN = (1.3, 2.2)  # the main object of a scene: 16-28 px in radius, a fifth to half of the image
DEPTH_BACKGROUND = ((6.5, 8.0), (9.0, 12.0))  # bottom and top rows of the background, each drawn from a range
RADIUS_AT_1M = 36.0  # pixels: an object's radius at depth d is RADIUS_AT_1M / d (7-28 px)
SEEDS = {"train": 0, "test": 1, "video": 2}
GENERATOR = "scenes-4"  # bump when what a seed generates changes: cached features of older scenes are stale
VIDEO_GENERATOR = "scenes-video-2"  # the same, for scenes-video


@functools.lru_cache(maxsize=None)
def _photo(name: str, size: int = 128) -> np.ndarray:
    """A photo resized to size x size, float [size, size, 3] in 0..1 (or [size, size] for textures)."""
    if name in PHOTOS:
        file, box = PHOTOS[name]
        im = Image.open(skimage_dir() / file).convert("RGB").crop(box)
    else:
        im = Image.open(skimage_dir() / name)
        im = im.convert("RGB") if im.mode not in ("L", "RGB") else im
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=None)
def _horse() -> np.ndarray:
    im = Image.open(skimage_dir() / "horse.png").convert("L").resize((128, 128), Image.BILINEAR)
    return (np.asarray(im, dtype=np.float32) / 255.0) < 0.5  # black silhouette on white


@functools.lru_cache(maxsize=None)
def _digits() -> np.ndarray:
    """MNIST digits [n, 28, 28] in 0..1 (the 4,000 of mnist5k's train split)."""
    return split_tensor(mnist5k(), "train").images[:, 0].numpy().astype(np.float32) / 255.0


def sample(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Nearest sample of img [n, n(, c)] at object coordinates u, v in [-1, 1] (outside: clamped)."""
    n = img.shape[0]
    i = np.clip(((v + 1) * 0.5 * n).astype(int), 0, n - 1)
    j = np.clip(((u + 1) * 0.5 * n).astype(int), 0, n - 1)
    return img[i, j]


@dataclass
class SceneObject:
    cls: int  # index into CLASSES
    x: float  # centre, pixels
    y: float
    depth: float  # metres
    angle: float  # radians
    fill: tuple  # (colour a, colour b, pattern, frequency, orientation) for shapes; digit index for digits
    vx: float = 0.0  # pixels per frame (video)
    vy: float = 0.0
    vdepth: float = 0.0  # metres per frame (video)

    def at(self, t: int, size: int) -> "SceneObject":
        """Where the object is at frame t: it moves at constant speed and bounces off the frame's edges."""
        d = float(np.clip(self.depth + self.vdepth * t, *DEPTH_OBJECTS))
        m = 0.6 * RADIUS_AT_1M / d * size / SIZE
        span = size - 2 * m
        x, y = (m + span - abs((p + v * t - m) % (2 * span) - span) for p, v in ((self.x, self.vx), (self.y, self.vy)))
        return SceneObject(self.cls, x, y, d, self.angle, self.fill)


def random_object(rng: np.random.Generator, size: int, depths: tuple[float, float] = DEPTH_OBJECTS) -> SceneObject:
    cls = int(rng.integers(1, len(CLASSES)))
    depth = float(rng.uniform(*depths))
    r = RADIUS_AT_1M / depth * size / SIZE
    x, y = (float(rng.uniform(r * 0.6, size - r * 0.6)) for _ in range(2))
    fill = (rng.uniform(0, 1, 3), rng.uniform(0, 1, 3), int(rng.integers(3)), float(rng.uniform(2, 6)),
            float(rng.uniform(0, np.pi)), int(rng.integers(len(_digits()))))
    return SceneObject(cls, x, y, depth, float(rng.uniform(-0.5, 0.5)), fill)


def pattern(u: np.ndarray, v: np.ndarray, fill: tuple) -> np.ndarray:
    """A shape's fill [h, w, 3]: two colours mixed by stripes, checks or grain in object coordinates."""
    a, b, kind, freq, theta = fill[:5]
    if kind == 0:
        t = 0.5 + 0.5 * np.sin(np.pi * freq * (u * np.cos(theta) + v * np.sin(theta)))
    elif kind == 1:
        t = ((np.floor((u + 1) * freq) + np.floor((v + 1) * freq)) % 2).astype(np.float32)
    else:  # grain fixed to the object, so that it moves with it
        grain = np.random.default_rng(int(freq * 1e6)).uniform(0, 1, (12, 12)).astype(np.float32)
        t = sample(grain, u, v)
    return a * t[..., None] + b * (1 - t[..., None])


def render_object(o: SceneObject, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inside: bool [size, size], colour: float [size, size, 3]) of one object."""
    r = RADIUS_AT_1M / o.depth * size / SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = (xx - o.x) / r, (yy - o.y) / r
    c, s = np.cos(o.angle), np.sin(o.angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # object coordinates, the object within [-1, 1]
    name = CLASSES[o.cls]
    if name == "disc":
        inside = u**2 + v**2 < 0.9
    elif name == "square":
        inside = np.maximum(abs(u), abs(v)) < 0.75
    elif name == "triangle":  # equilateral, pointing up in object coordinates
        inside = (v < 0.5) & (np.sqrt(3) * u - v < 1.0) & (-np.sqrt(3) * u - v < 1.0)
    elif name == "star":
        rho, phi = np.sqrt(u**2 + v**2), np.arctan2(v, u)
        inside = rho < 0.55 + 0.4 * np.cos(5 * phi)
    elif name == "digit":
        inside = sample(_digits()[o.fill[5]], u * 0.85, v * 0.85) > 0.3
    elif name == "horse":
        inside = sample(_horse(), u, v) & (abs(u) < 1) & (abs(v) < 1)
    else:  # a photo object: an ellipse of the photo around it
        inside = u**2 + (v * 0.9) ** 2 < 1.0
        return inside, sample(_photo(name), u, v * 0.9)
    return inside, pattern(u, v, o.fill)


def backdrop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A scene's own backdrop [size, size, 3]: smoothed colour noise, a gradient between two colours, or a zoomed,
    tinted photo texture, at low contrast (it is far)."""
    n = size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    kind = int(rng.integers(3))
    if kind == 0:
        coarse = rng.uniform(0, 1, (8, 8, 3)).astype(np.float32)
        img = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((n, n), Image.BICUBIC),
                         dtype=np.float32) / 255.0
    elif kind == 1:
        a, b, theta = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3), rng.uniform(0, 2 * np.pi)
        img = np.clip(0.5 + (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta), 0, 1)[..., None]
        img = a * img + b * (1 - img)
    else:
        tex = _photo(TEXTURES[int(rng.integers(len(TEXTURES)))])
        tex = tex[..., None].repeat(3, -1) if tex.ndim == 2 else tex
        zoom, m = rng.uniform(0.3, 0.8), tex.shape[0]
        i0, j0 = (int(rng.integers(0, int(m * (1 - zoom)) + 1)) for _ in range(2))
        img = tex[(i0 + yy * zoom * m).astype(int), (j0 + xx * zoom * m).astype(int)] * rng.uniform(0.6, 1.0, 3)
    mean = img.mean((0, 1))
    return (mean + rng.uniform(0.3, 0.6) * (img - mean)).astype(np.float32)


def background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(colour [size, size, 3], depth [size, size]): a backdrop with grain and clutter, a plane receding from the
    bottom row to the top."""
    img = backdrop(rng, size)
    mean = img.mean((0, 1))
    img = img + rng.normal(0, 0.03, img.shape)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(0, 7))):  # clutter: short strokes, part of the background
        x0, y0 = rng.uniform(0, size, 2)
        ang, length, width = rng.uniform(0, np.pi), rng.uniform(3, 10), rng.uniform(0.6, 1.5)
        along = (xx - x0) * np.cos(ang) + (yy - y0) * np.sin(ang)
        across = -(xx - x0) * np.sin(ang) + (yy - y0) * np.cos(ang)
        img[(abs(along) < length) & (abs(across) < width)] = np.clip(mean + rng.uniform(-0.3, 0.3, 3), 0, 1)
    bottom, top = rng.uniform(*DEPTH_BACKGROUND[0]), rng.uniform(*DEPTH_BACKGROUND[1])
    depth = top + (bottom - top) * yy / size
    return img.astype(np.float32), depth.astype(np.float32)


def compose(bg: tuple[np.ndarray, np.ndarray], objects: list[SceneObject], size: int):
    """(image uint8 [3, S, S], class mask [S, S], instance mask [S, S] (object i+1), depth [S, S]): objects
    painted far to near, so the nearer one occludes."""
    img, depth = bg[0].copy(), bg[1].copy()
    classes, instances = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8)
    for i in sorted(range(len(objects)), key=lambda k: -objects[k].depth):
        inside, colour = render_object(objects[i], size)
        img[inside], depth[inside] = colour[inside], objects[i].depth
        classes[inside], instances[inside] = objects[i].cls, i + 1
    image = (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(2, 0, 1)
    return image, classes, instances, depth


def scene(split: str, index: int, size: int = SIZE):
    """One scene: a main object, near and towards the middle (as in an object-centric photo), and up to two
    farther ones."""
    rng = np.random.default_rng([SEEDS[split], index])
    main = random_object(rng, size, DEPTH_MAIN)
    main.x, main.y = (float(size / 2 + rng.uniform(-0.25, 0.25) * size) for _ in range(2))
    others = [random_object(rng, size, (DEPTH_MAIN[1], DEPTH_OBJECTS[1])) for _ in range(int(rng.integers(0, 3)))]
    return compose(background(rng, size), [main, *others], size)


@dataclass
class SceneArrays:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    masks: torch.Tensor  # int64 [N, S, S]: class per pixel
    depth: torch.Tensor  # float32 [N, S, S], metres
    labels: torch.Tensor  # int64 [N]: the class of the largest visible object, minus one (0 = disc)


@functools.lru_cache(maxsize=None)
def scene_arrays(split: str) -> SceneArrays:
    """The fixed split of `scenes` (train: 2,000, test: 500), generated once per process."""
    parts = [scene(split, i) for i in range(N_SPLIT[split])]
    masks = np.stack([p[1] for p in parts])
    counts = np.stack([np.bincount(m.ravel(), minlength=len(CLASSES))[1:] for m in masks])
    return SceneArrays(torch.from_numpy(np.stack([p[0] for p in parts])), torch.from_numpy(masks.astype(np.int64)),
                       torch.from_numpy(np.stack([p[3] for p in parts])), torch.from_numpy(counts.argmax(1)))


class SceneSet(DenseSource):
    """One split of `scenes` as a dense set: image, class mask, depth."""

    def __init__(self, split: str):
        self.arrays = scene_arrays(split)
        self.name, self.classes, self.files, self.generator = f"scenes:{split}", list(CLASSES), None, GENERATOR
        self.has_masks = self.has_depth = True
        self.max_depth = DEPTH_BACKGROUND[1][1]

    def __len__(self) -> int:
        return len(self.arrays.images)

    def __getitem__(self, i: int) -> DenseItem:
        a = self.arrays
        return DenseItem(a.images[i], a.masks[i], a.depth[i])


class SceneSequence(VideoSequence):
    def __init__(self, index: int, frames: int = N_FRAMES, size: int = VIDEO_SIZE):
        rng = np.random.default_rng([SEEDS["video"], index])
        bg = background(rng, size)
        objects = [random_object(rng, size, (1.8, 3.5)) for _ in range(int(rng.integers(2, 4)))]
        for o in objects:  # across the frame in a sequence, towards or away from the camera
            o.vx, o.vy = (float(rng.uniform(-2.5, 2.5)) * size / SIZE for _ in range(2))  # 2.5 px at 64 px
            o.vdepth = float(rng.uniform(-0.15, 0.15))
        parts = [compose(bg, [o.at(t, size) for o in objects], size) for t in range(frames)]
        self.name = f"scene{index:03d}"
        self.frames = [torch.from_numpy(p[0]) for p in parts]
        self.masks = [torch.from_numpy(p[2]) for p in parts]

    def __len__(self) -> int:
        return len(self.frames)

    def frame(self, t: int) -> torch.Tensor:
        return self.frames[t]

    def mask(self, t: int) -> torch.Tensor:
        return self.masks[t]


class SceneVideos(VideoSource):
    def __init__(self, n: int = N_VIDEOS):
        self.name, self.files, self.generator = "scenes-video", None, VIDEO_GENERATOR
        self.sequences = [SceneSequence(i) for i in range(n)]


def write_example(path: Path, n: int = 8) -> None:
    """A strip of n test scenes over their masks and depth (to look at the generator)."""
    a = scene_arrays("test")
    rows = [np.concatenate(list(a.images[:n].permute(0, 2, 3, 1).numpy()), 1)]
    cmap = (np.array([[0, 0, 0]] + [[(37 * k) % 255, (97 * k) % 255, (173 * k) % 255] for k in range(1, 10)]))
    rows.append(np.concatenate([cmap[m] for m in a.masks[:n].numpy()], 1).astype(np.uint8))
    d = a.depth[:n].numpy()
    rows.append(np.concatenate(list((255 * (1 - d / d.max()))[..., None].repeat(3, -1).astype(np.uint8)), 1))
    Image.fromarray(np.concatenate(rows, 0)).resize((n * 128, 3 * 128), Image.NEAREST).save(path)
