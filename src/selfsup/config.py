"""Typed configuration: dataclass defaults (the papers'), YAML recipes on top, then dotted overrides `a.b=c`.

Every key is checked: an unknown key or a value of the wrong type is a `UserError` naming the key and what
was expected. The resolved config is saved with every run, so a run folder says exactly what it did.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

RECIPES = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    source: str = "mnist5k"  # mnist5k | digits | skimage | a folder of images | webdataset shards 'x/{000..009}.tar'
    num_workers: int = 1  # loader processes; 0 decodes and crops in the training process
    eval_source: str | None = None  # labelled data for periodic/final k-NN; default: the training source


@dataclass
class CropsConfig:
    """DINO multi-crop (DINO Sec. 3.1) with BYOL's augmentations (BYOL Table 6)."""

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8  # DINO: 8 local crops of 96 px
    global_scale: tuple[float, float] = (0.4, 1.0)  # DINO main_dino.py default
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio, sampled log-uniformly (BYOL)
    flip: float = 0.5
    color_jitter: float = 0.8  # probability of applying it
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: tuple[float, float, float] = (1.0, 0.1, 0.5)  # probability on global crop 1, global crop 2, locals
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the crop (BYOL, DINO)
    solarize: tuple[float, float, float] = (0.0, 0.2, 0.0)  # probability on global 1, global 2, locals
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet statistics
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class BackboneConfig:
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_giant2 | resnet18/34/50/101
    patch_size: int = 16
    depth: int | None = None  # override the arch's number of blocks (small CPU recipes)
    img_size: int = 224  # the position embedding is built for this size and interpolated to others
    drop_path: float = 0.1  # stochastic depth rate of the student (DINO: 0.1)
    drop_path_uniform: bool = False  # DINOv2: the same rate in every block; DINO: linear over depth
    layerscale: float | None = None  # DINOv2: 1e-5
    ffn: str = "mlp"  # mlp | swiglu
    n_registers: int = 0  # DINOv2 "Vision Transformers Need Registers"
    qkv_bias: bool = True
    # position-embedding resize: bicubic by a factor (n + offset) / M (DINO, DINOv2), or with offset 0 to the
    # size, antialiased (DINOv2's register models)
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    cifar_stem: bool = False  # ResNet: 3x3 stride-1 first conv and no max-pool, for small images (SimCLR B.9)


@dataclass
class DinoConfig:
    """DINO head and loss (DINO Sec. 3.1, Appendix; main_dino.py defaults)."""

    out_dim: int = 65536  # K prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    norm_last_layer: bool = True  # freeze the weight-norm magnitude g at 1
    use_bn: bool = False  # BatchNorm in the head's MLP (main_dino.py use_bn_in_head; the teacher's uses batch statistics)
    student_temp: float = 0.1  # tau_s
    center_momentum: float = 0.9  # m in c <- m c + (1 - m) mean(g_t)
    loss_weight: float = 1.0


@dataclass
class TeacherConfig:
    momentum: float = 0.996  # lambda, cosine schedule to momentum_end (DINO Sec. 3.1)
    momentum_end: float = 1.0
    temp: float = 0.07  # tau_t after the warm-up
    warmup_temp: float = 0.04
    warmup_temp_epochs: float = 30.0


@dataclass
class SimCLRConfig:
    """SimCLR projection head g(.) and NT-Xent (SimCLR Sec. 2.1, Alg. 1; Appendix B.9)."""

    hidden_dim: int = 2048
    out_dim: int = 128
    n_layers: int = 2  # SimCLR v1: 2 (Linear-BN-ReLU-Linear-BN); SimCLR v2: 3
    temperature: float = 0.1  # tau: 0.1 at batch 4096 (Table 5); 0.5 suits small batches


@dataclass
class MocoConfig:
    """MoCo v3 (Chen et al., 2021, Alg. 1) by default; version 2 is MoCo v2's queue (He et al. 2020 Sec. 3.2)."""

    version: int = 3  # 3: in-batch negatives, predictor, symmetric loss | 2: queue of negatives, no predictor
    temperature: float = 0.2  # tau (MoCo v3 ViT: 0.2; MoCo v2: 0.2)
    hidden_dim: int = 4096  # projector (v3: 3 layers 4096-4096-256; v2: 2 layers 2048-128, no BN)
    out_dim: int = 256
    n_layers: int = 3
    pred_hidden_dim: int = 4096  # v3 predictor: 2 layers 4096-256
    queue_size: int = 65536  # v2: K keys in the dictionary
    # shuffling BN (MoCo Sec. 3.3) for BatchNorm backbones: BatchNorm statistics over this many groups of the
    # global batch (MoCo's GPUs; split among the ranks, a multiple of their number), the keys' groups drawn from
    # the shuffled global batch, so a query and its key do not share statistics; 0: off
    shuffle_bn: int = 0


@dataclass
class BYOLConfig:
    """BYOL projector and predictor: Linear(4096)-BN-ReLU-Linear(256) each (BYOL Sec. 3.3)."""

    hidden_dim: int = 4096
    out_dim: int = 256
    predictor: bool = True  # False: the ablation that collapses (BYOL Sec. 5, Table 5b)


@dataclass
class IBOTConfig:
    """iBOT masked image modelling (Zhou et al. 2022 Sec. 3.2); DINOv2's names (ssl_default_config.yaml)."""

    loss_weight: float = 1.0  # L = L_[CLS] + loss_weight x L_MIM
    mask_sample_probability: float = 0.5  # share of global crops that are masked (iBOT: pred_ratio [0, 0.3])
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # masked share of a crop ~ U(0.1, 0.5) (iBOT 0.3 +- 0.2)
    mask_min_aspect: float = 0.3  # BEiT blocks: aspect ratio in [0.3, 1 / 0.3]
    separate_head: bool = False  # iBOT: one head for [CLS] and patches; DINOv2: untied heads
    head_n_prototypes: int = 8192  # used with separate_head; a shared head uses dino.out_dim
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_n_layers: int = 3
    teacher_temp: float = 0.07  # the patch tokens' own tau_t (iBOT teacher_patch_temp), warmed up like teacher.temp
    warmup_teacher_temp: float = 0.04
    center_momentum: float = 0.9  # the patch tokens' own centre


@dataclass
class DINOv2Config:
    """What DINOv2 adds to iBOT (Oquab et al. 2023 Sec. 4)."""

    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp (SwAV-style, DINOv2) | centering (DINO's centre)
    sinkhorn_iterations: int = 3
    koleo_loss_weight: float = 0.1  # KoLeo regulariser on the student's global-crop [CLS] (Sec. 4)


@dataclass
class DistillConfig:
    """Distillation into a smaller student (DINOv2 Sec. 5): a frozen teacher, a spare EMA of the student."""

    teacher: str | None = None  # a selfsup run folder or checkpoint of dino / ibot / dinov2 (with its heads)


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | lars (SimCLR, BYOL) | sgd (momentum 0.9; MoCo v2)
    epochs: float = 100.0
    steps: int | None = None  # a fixed number of steps instead of epochs
    batch_size: int = 64  # global batch (all ranks together)
    lr: float = 5e-4  # base lr, scaled by lr_scaling (DINO: 0.0005 x B / 256)
    lr_scaling: str = "linear"  # linear (DINO) | sqrt (DINOv2, base batch 1024) | none
    lr_base_batch: int = 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04  # cosine to weight_decay_end (DINO)
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # global norm; 0 disables
    freeze_last_layer_epochs: float = 1.0
    schedule_epochs: float | None = 100.0  # the epoch counts above are for a run this long; scaled to the run
    betas: tuple[float, float] = (0.9, 0.999)
    decay_all: bool = False  # weight decay on biases, norms and tokens too (MoCo v2's SGD, torchvision-style)
    layerwise_decay: float = 1.0  # DINOv2: 0.9
    patch_embed_lr_mult: float = 1.0  # DINOv2: 0.2


@dataclass
class TrainConfig:
    out: str | None = None  # run folder; default runs/<method>-<arch>-<data>
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False
    attention: str = "auto"  # auto | flash | math | efficient: the scaled_dot_product_attention backend
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0: at each epoch end
    keep_last: int = 2
    threads: int | None = None  # torch CPU threads; default: what torch chooses
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row
    distributed: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per transformer block) under torchrun


@dataclass
class EvalConfig:
    every: int = 0  # run k-NN every N steps during training (0: only at the end)
    k: int = 20  # DINO's weighted k-NN
    temperature: float = 0.07
    final: bool = True  # k-NN of the teacher backbone, raw pixels and random init at the end


@dataclass
class Config:
    method: str = "dino"
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists) for YAML and checkpoints."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotated type `tp`; convert ints to floats and lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except UserError:
                pass
        raise UserError(f"{where}: bad value for '{key}': {value!r} (expected {_describe(tp)})")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{where}: bad value for '{key}': {value!r} (expected a list of {len(args)} numbers)")
        return tuple(_coerce(v, a, key, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise UserError(f"{where}: bad value for '{key}': {value!r} (expected {_describe(tp)})")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply(cfg: Any, values: dict, where: str, prefix: str = "") -> None:
    """Set `values` (a nested dict) on the dataclass `cfg`, checking every key and type."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys to values")
    hints = _hints(type(cfg))
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise UserError(f"{where}: unknown config key '{key}' (known here: {known})")
        current = getattr(cfg, k)
        if dataclasses.is_dataclass(current):
            apply(current, v, where, key + ".")
        else:
            setattr(cfg, k, _coerce(v, hints[k], key, where))


def recipe_path(name_or_path: str) -> Path:
    """A recipe by path, or by name among the recipes shipped with selfsup."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    shipped = RECIPES / f"{p.stem}.yaml"
    if shipped.exists() and p.parent == Path("."):
        return shipped
    names = ", ".join(sorted(r.stem for r in RECIPES.glob("*.yaml")))
    raise UserError(f"config '{name_or_path}' not found (a YAML file, or one of: {names})")


def load_recipe(cfg: Config, name_or_path: str) -> None:
    path = recipe_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    apply(cfg, values, str(path))


def parse_override(text: str) -> dict:
    """'optim.lr=1e-3' -> {'optim': {'lr': 0.001}}; the value is read as YAML ('[0.4, 1]', 'null', 'true')."""
    if "=" not in text:
        raise UserError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(values: dict, where: str = "config") -> Config:
    cfg = Config()
    apply(cfg, values, where)
    return cfg
