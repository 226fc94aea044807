"""Typed configuration: dataclass defaults (the papers'), YAML recipes on top, then dotted overrides `a.b=c`.

Every key is checked: an unknown key or a value of the wrong type is a `UserError` naming the key and what
was expected, and `validate` holds the resolved config to each key's rules (choices, ranges, other keys), declared
beside its default with `checked`. The resolved config is saved with every run, so a run folder says exactly what
it did.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .core.errors import UserError

RECIPES = Path(__file__).parent / "configs"
RECIPE_DIRS: list[Path] = [RECIPES]  # the shipped recipes, then those of methods registered with theirs

# the choices of keys whose values other modules implement (tests/test_config_checks.py holds them to the same)
METHOD_NAMES = ["simclr", "moco", "byol", "dino", "ibot", "dinov2", "distill"]  # selfsup.methods.register_method
VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2")  # selfsup.nn.vit.VIT_SIZES
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")  # selfsup.nn.resnet.RESNETS
LOGGERS = ("tensorboard", "wandb", "mlflow", "csv")  # selfsup.training.loggers.KINDS


class Rule:
    """What a key accepts beyond its type. This base rule accepts every value of the type."""

    def expected(self, value: Any, cfg: Config) -> str | None:
        """None for a good value, else what was expected (the end of the error message)."""
        return None


ANY = Rule()


@dataclass(frozen=True)
class EachOf(Rule):
    """A list of distinct items, each one of `choices`."""

    choices: tuple

    def expected(self, value: Any, cfg: Config) -> str | None:
        if all(v in self.choices for v in value) and len(set(value)) == len(value):
            return None
        return "a list of distinct names among: " + ", ".join(map(str, self.choices))


@dataclass(frozen=True)
class OneOf(Rule):
    choices: tuple

    def expected(self, value: Any, cfg: Config) -> str | None:
        return None if value in self.choices else "one of: " + ", ".join(map(str, self.choices))


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Range(Rule):
    """lo <= value <= hi, or < at an open end; a tuple: each of its numbers, and when `ordered`, first <= second."""

    lo: float
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    ordered: bool = False

    def holds(self, x: float) -> bool:
        above = x > self.lo or (x == self.lo and not self.open_lo)
        below = self.hi is None or x < self.hi or (x == self.hi and not self.open_hi)
        return math.isfinite(x) and above and below

    def expected(self, value: Any, cfg: Config) -> str | None:
        xs = value if isinstance(value, tuple) else (value,)
        if all(map(self.holds, xs)) and not (self.ordered and xs[0] > xs[-1]):
            return None
        if isinstance(value, tuple):
            noun = f"{len(value)} numbers"
        else:
            noun = "an integer" if isinstance(value, int) else "a number"
        return f"{noun} {self.bounds()}" + (", the first <= the second" if self.ordered else "")

    def bounds(self) -> str:
        """'>= 1', '> 0', 'in (0, 1]'."""
        if self.hi is None:
            return f"{'>' if self.open_lo else '>='} {_number(self.lo)}"
        left, right = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
        return f"in {left}{_number(self.lo)}, {_number(self.hi)}{right}"


@dataclass(frozen=True)
class Pattern(Rule):
    regex: str
    description: str

    def expected(self, value: Any, cfg: Config) -> str | None:
        return None if re.fullmatch(self.regex, value) else self.description


@dataclass(frozen=True)
class Needs(Rule):
    """A check against other keys: `ok(value, cfg)`, else `says(cfg)`."""

    ok: Callable[[Any, Config], bool]
    says: Callable[[Config], str]

    def expected(self, value: Any, cfg: Config) -> str | None:
        return None if self.ok(value, cfg) else self.says(cfg)


DURATION = "a positive duration like 90s, 10m, 2h or 1h30m"
_DURATION_PART = r"(\d+(?:\.\d+)?)([dhms])"
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def _seconds(text: str) -> float | None:
    """'1h30m' -> 5400.0; None unless it is a sum of number-unit parts, more than 0 in all."""
    if not re.fullmatch(f"(?:{_DURATION_PART})+", text.strip()):
        return None
    total = sum(float(n) * _SECONDS[unit] for n, unit in re.findall(_DURATION_PART, text))
    return total if total > 0 else None


class Duration(Rule):
    def expected(self, value: Any, cfg: Config) -> str | None:
        return None if _seconds(value) else DURATION


NON_NEGATIVE = Range(0)
POSITIVE = Range(0, open_lo=True)
AT_LEAST_1 = Range(1)  # counts, sizes, widths
UNIT = Range(0, 1)  # probabilities, momenta
BELOW_1 = Range(0, 1, open_hi=True)  # drop path, Adam's betas
FRACTION = Range(0, 1, open_lo=True)
NON_EMPTY = Pattern(r"(?s).*\S.*", "a non-empty string")
# a ViT cuts an image into backbone.patch_size patches: a smaller one has none
COVERS_PATCH = Needs(lambda v, c: c.backbone.arch not in VIT_ARCHS or v >= c.backbone.patch_size,
                     lambda c: f"at least backbone.patch_size = {c.backbone.patch_size}")
# DINO's loss pairs each global view with every other view (simclr, moco and byol check n_global = 2 themselves)
TWO_VIEWS = Needs(lambda v, c: c.crops.n_global + v >= 2,
                  lambda c: f"at least {2 - c.crops.n_global} with crops.n_global = {c.crops.n_global}, for 2 views")


BLUR_KERNEL = Needs(lambda v, c: v in ("auto", 0) or (type(v) is int and v >= 3 and v % 2 == 1),
                    lambda c: "auto, 0 or an odd kernel size >= 3")


@dataclass(frozen=True)
class AutoOr(Rule):
    """'auto', or a list of numbers each passing `each` (crops.mean, crops.std)."""

    each: Range

    def expected(self, value: Any, cfg: Config) -> str | None:
        if value == "auto" or (isinstance(value, tuple) and value and self.each.expected(value, cfg) is None):
            return None
        return f"auto or a list of numbers {self.each.bounds()}"


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def one_per_channel(default: tuple) -> Needs:
    """Channel statistics: auto, `default` (ImageNet's RGB ones, auto for another channel count) or one number per
    backbone.in_chans."""
    return Needs(lambda v, c: v == "auto" or v == default or len(v) == c.backbone.in_chans,
                 lambda c: f"auto or {c.backbone.in_chans} numbers, one per channel (backbone.in_chans)")


def checked(default: Any, rule: Rule, *more: Rule) -> Any:
    """A config field with its default and the rules its value must pass (ANY when every value of its type does)."""
    return field(default=default, metadata={"rules": (rule, *more)})


@dataclass
class DataConfig:
    # mnist5k | digits | skimage | a folder of images | webdataset shards 'x/{000..009}.tar'
    source: str = checked("mnist5k", NON_EMPTY)
    num_workers: int = checked(1, NON_NEGATIVE)  # loader processes; 0 decodes and crops in the training process
    # labelled data for periodic/final k-NN; default: the training source
    eval_source: str | None = checked(None, NON_EMPTY)


@dataclass
class CropsConfig:
    """DINO multi-crop (DINO Sec. 3.1) with BYOL's augmentations (BYOL Table 6)."""

    global_size: int = checked(224, AT_LEAST_1, COVERS_PATCH)
    local_size: int = checked(96, AT_LEAST_1, COVERS_PATCH)
    n_global: int = checked(2, AT_LEAST_1)
    n_local: int = checked(8, NON_NEGATIVE, TWO_VIEWS)  # DINO: 8 local crops of 96 px
    # DINO main_dino.py default
    global_scale: tuple[float, float] = checked((0.4, 1.0), Range(0, 1, open_lo=True, ordered=True))
    local_scale: tuple[float, float] = checked((0.05, 0.4), Range(0, 1, open_lo=True, ordered=True))
    # aspect ratio, sampled log-uniformly (BYOL)
    ratio: tuple[float, float] = checked((3 / 4, 4 / 3), Range(0, open_lo=True, ordered=True))
    flip: float = checked(0.5, UNIT)
    color_jitter: float = checked(0.8, UNIT)  # probability of applying it
    brightness: float = checked(0.4, UNIT)  # factors in [1 - x, 1 + x]
    contrast: float = checked(0.4, UNIT)
    saturation: float = checked(0.2, UNIT)
    hue: float = checked(0.1, Range(0, 0.5))  # a shift in [-x, x] of a turn
    grayscale: float = checked(0.2, UNIT)
    # probability on global crop 1, global crop 2, locals
    blur: tuple[float, float, float] = checked((1.0, 0.1, 0.5), UNIT)
    # in pixels of the crop (BYOL, DINO)
    blur_sigma: tuple[float, float] = checked((0.1, 2.0), Range(0, open_lo=True, ordered=True))
    # the blur's kernel: auto (the method's reference: 9 for dinov2 and distill, 0 for the others), 0 (each image's
    # kernel reaches ceil(3 sigma): close to PIL's GaussianBlur(radius=sigma) of dino, ibot, moco-v3 and BYOL) or an
    # odd size, whatever sigma (torchvision's GaussianBlur(kernel_size), dinov2/data/transforms.py: 9)
    blur_kernel: int | str = checked("auto", BLUR_KERNEL)
    # probability on global 1, global 2, locals
    solarize: tuple[float, float, float] = checked((0.0, 0.2, 0.0), UNIT)
    # normalisation, one number per input channel, or auto: computed from a sample of the training data and saved
    # in the run's config.yaml. ImageNet's RGB statistics by default, which with backbone.in_chans != 3 mean auto
    mean: tuple[float, ...] | str = checked(IMAGENET_MEAN, AutoOr(UNIT), one_per_channel(IMAGENET_MEAN))
    std: tuple[float, ...] | str = checked(IMAGENET_STD, AutoOr(POSITIVE), one_per_channel(IMAGENET_STD))


@dataclass
class BackboneConfig:
    # vit_tiny | vit_small | vit_base | vit_large | vit_giant2 | resnet18/34/50/101
    arch: str = checked("vit_small", OneOf(VIT_ARCHS + RESNET_ARCHS))
    patch_size: int = checked(16, AT_LEAST_1)
    depth: int | None = checked(None, AT_LEAST_1)  # override the arch's number of blocks (small CPU recipes)
    # the position embedding is built for this size and interpolated to others
    img_size: int = checked(224, AT_LEAST_1, COVERS_PATCH)
    drop_path: float = checked(0.1, BELOW_1)  # stochastic depth rate of the student (DINO: 0.1)
    drop_path_uniform: bool = checked(False, ANY)  # DINOv2: the same rate in every block; DINO: linear over depth
    layerscale: float | None = checked(None, POSITIVE)  # DINOv2: 1e-5
    ffn: str = checked("mlp", OneOf(("mlp", "swiglu")))
    n_registers: int = checked(0, NON_NEGATIVE)  # DINOv2 "Vision Transformers Need Registers"
    qkv_bias: bool = checked(True, ANY)
    num_heads: int | None = checked(None, AT_LEAST_1)  # override the arch's attention heads (MoCo v3's ViT-S: 12)
    # ViT position embedding: learned (DINO, DINOv2) | sincos: fixed 2-D sin-cos, not trained (MoCo v3 vits.py)
    pos_embed: str = checked("learned", OneOf(("learned", "sincos")))
    # ViT patch projection kept at its random init, no gradient (MoCo v3's --stop-grad-conv1)
    freeze_patch_embed: bool = checked(False, ANY)
    # ViT init: trunc_normal (DINO, DINOv2: Linears N(0, 0.02) truncated) | xavier (MoCo v3 vits.py: Xavier-uniform
    # Linears with Q, K, V as three matrices and Xavier-uniform patch projection, zero biases)
    init: str = checked("trunc_normal", OneOf(("trunc_normal", "xavier")))
    # position-embedding resize: bicubic by a factor (n + offset) / M (DINO, DINOv2), or with offset 0 to the
    # size, antialiased (DINOv2's register models)
    interpolate_antialias: bool = checked(False, ANY)
    interpolate_offset: float = checked(0.1, NON_NEGATIVE)
    # ResNet: 3x3 stride-1 first conv and no max-pool, for small images (SimCLR B.9)
    cifar_stem: bool = checked(False, ANY)
    # input channels: 3 (RGB), 1 (grayscale), 4+ (multispectral: multi-channel TIFF, .npy); a 3-channel checkpoint
    # loaded into another count has its patch embedding / first conv adapted (nn/adapt.py)
    in_chans: int = checked(3, AT_LEAST_1)


@dataclass
class DinoConfig:
    """DINO head and loss (DINO Sec. 3.1, Appendix; main_dino.py defaults)."""

    out_dim: int = checked(65536, AT_LEAST_1)  # K prototypes
    hidden_dim: int = checked(2048, AT_LEAST_1)
    bottleneck_dim: int = checked(256, AT_LEAST_1)
    n_layers: int = checked(3, AT_LEAST_1)
    norm_last_layer: bool = checked(True, ANY)  # freeze the weight-norm magnitude g at 1
    # BatchNorm in the head's MLP (main_dino.py use_bn_in_head; the teacher's uses batch statistics)
    use_bn: bool = checked(False, ANY)
    student_temp: float = checked(0.1, POSITIVE)  # tau_s
    center_momentum: float = checked(0.9, UNIT)  # m in c <- m c + (1 - m) mean(g_t)
    loss_weight: float = checked(1.0, NON_NEGATIVE)


def dino_teacher_only(default: float) -> Needs:
    """teacher.* is the DINO family's teacher: BYOL's target and MoCo's key encoder have their own momentum."""
    return Needs(lambda v, c: c.method not in ("byol", "moco") or v == default,
                 lambda c: f"the default {default}: {c.method}'s momentum is {c.method}.momentum")


@dataclass
class TeacherConfig:
    """The DINO family's momentum teacher (DINO, iBOT, DINOv2, distill's spare EMA): EMA and temperature."""

    momentum: float = checked(0.996, UNIT, dino_teacher_only(0.996))  # lambda, cosine to momentum_end (Sec. 3.1)
    momentum_end: float = checked(1.0, UNIT, dino_teacher_only(1.0))
    temp: float = checked(0.07, POSITIVE)  # tau_t after the warm-up
    warmup_temp: float = checked(0.04, POSITIVE)
    warmup_temp_epochs: float = checked(30.0, NON_NEGATIVE)


@dataclass
class SimCLRConfig:
    """SimCLR projection head g(.) and NT-Xent (SimCLR Sec. 2.1, Alg. 1; Appendix B.9)."""

    hidden_dim: int = checked(2048, AT_LEAST_1)
    out_dim: int = checked(128, AT_LEAST_1)
    n_layers: int = checked(2, AT_LEAST_1)  # SimCLR v1: 2 (Linear-BN-ReLU-Linear-BN); SimCLR v2: 3
    temperature: float = checked(0.1, POSITIVE)  # tau: 0.1 at batch 4096 (Table 5); 0.5 suits small batches


@dataclass
class MocoConfig:
    """MoCo v3 (Chen et al., 2021, Alg. 1) by default; version 2 is MoCo v2's queue (He et al. 2020 Sec. 3.2)."""

    # 3: in-batch negatives, predictor, symmetric loss | 2: queue of negatives, no predictor
    version: int = checked(3, OneOf((2, 3)))
    temperature: float = checked(0.2, POSITIVE)  # tau (MoCo v3 ViT: 0.2; MoCo v2: 0.2)
    # projector (v3: 3 layers 4096-4096-256; v2: 2 layers 2048-128, no BN)
    hidden_dim: int = checked(4096, AT_LEAST_1)
    out_dim: int = checked(256, AT_LEAST_1)
    n_layers: int = checked(3, AT_LEAST_1)
    pred_hidden_dim: int = checked(4096, AT_LEAST_1)  # v3 predictor: 2 layers 4096-256
    queue_size: int = checked(65536, AT_LEAST_1)  # v2: K keys in the dictionary
    # shuffling BN (MoCo Sec. 3.3) for BatchNorm backbones: BatchNorm statistics over this many groups of the
    # global batch (MoCo's GPUs; split among the ranks, a multiple of their number), the keys' groups drawn from
    # the shuffled global batch, so a query and its key do not share statistics; 0: off
    shuffle_bn: int = checked(0, NON_NEGATIVE)
    # the key encoder's EMA: m from momentum, on a cosine to momentum_end (MoCo v3 main_moco.py --moco-m 0.99,
    # --moco-m-cos; MoCo v2: 0.999 constant)
    momentum: float = checked(0.99, UNIT)
    momentum_end: float = checked(1.0, UNIT)


@dataclass
class BYOLConfig:
    """BYOL projector and predictor: Linear(4096)-BN-ReLU-Linear(256) each (BYOL Sec. 3.3)."""

    hidden_dim: int = checked(4096, AT_LEAST_1)
    out_dim: int = checked(256, AT_LEAST_1)
    predictor: bool = checked(True, ANY)  # False: the ablation that collapses (BYOL Sec. 5, Table 5b)
    # the target's EMA: tau from momentum on a cosine to momentum_end (BYOL Sec. 3.2: tau_base 0.996 -> 1)
    momentum: float = checked(0.996, UNIT)
    momentum_end: float = checked(1.0, UNIT)


@dataclass
class IBOTConfig:
    """iBOT masked image modelling (Zhou et al. 2022 Sec. 3.2); DINOv2's names (ssl_default_config.yaml)."""

    loss_weight: float = checked(1.0, NON_NEGATIVE)  # L = L_[CLS] + loss_weight x L_MIM
    # share of global crops that are masked (iBOT: pred_ratio [0, 0.3])
    mask_sample_probability: float = checked(0.5, UNIT)
    # masked share of a crop ~ U(0.1, 0.5) (iBOT 0.3 +- 0.2)
    mask_ratio_min_max: tuple[float, float] = checked((0.1, 0.5), Range(0, 1, ordered=True))
    mask_min_aspect: float = checked(0.3, FRACTION)  # BEiT blocks: aspect ratio in [0.3, 1 / 0.3]
    # whose masking rule: ibot (each global crop masked with mask_sample_probability, smallest block (grid/3)^2;
    # ibot loader.py) | dinov2 (exactly that share of a batch's global crops, ratios spread evenly over the range,
    # blocks of 4 to N/2 patches; dinov2 data/collate.py) | auto: the method's own (iBOT: ibot, DINOv2: dinov2)
    masking: str = checked("auto", OneOf(("auto", "ibot", "dinov2")))
    separate_head: bool = checked(False, ANY)  # iBOT: one head for [CLS] and patches; DINOv2: untied heads
    head_n_prototypes: int = checked(8192, AT_LEAST_1)  # used with separate_head; a shared head uses dino.out_dim
    head_hidden_dim: int = checked(2048, AT_LEAST_1)
    head_bottleneck_dim: int = checked(256, AT_LEAST_1)
    head_n_layers: int = checked(3, AT_LEAST_1)
    # the patch tokens' own tau_t (iBOT teacher_patch_temp), warmed up like teacher.temp
    teacher_temp: float = checked(0.07, POSITIVE)
    warmup_teacher_temp: float = checked(0.04, POSITIVE)
    center_momentum: float = checked(0.9, UNIT)  # the patch tokens' own centre


@dataclass
class DINOv2Config:
    """What DINOv2 adds to iBOT (Oquab et al. 2023 Sec. 4)."""

    # sinkhorn_knopp (SwAV-style, DINOv2) | centering (DINO's centre)
    centering: str = checked("sinkhorn_knopp", OneOf(("sinkhorn_knopp", "centering")))
    sinkhorn_iterations: int = checked(3, AT_LEAST_1)
    # KoLeo regulariser on the student's global-crop [CLS] (Sec. 4)
    koleo_loss_weight: float = checked(0.1, NON_NEGATIVE)


@dataclass
class DistillConfig:
    """Distillation into a smaller student (DINOv2 Sec. 5): a frozen teacher, a spare EMA of the student."""

    # a selfsup run folder or checkpoint of dino / ibot / dinov2 (with its heads)
    teacher: str | None = checked(None, NON_EMPTY)


@dataclass
class OptimConfig:
    # adamw | lars (SimCLR, BYOL) | sgd (momentum 0.9; MoCo v2)
    optimizer: str = checked("adamw", OneOf(("adamw", "lars", "sgd")))
    epochs: float = checked(100.0, POSITIVE)
    steps: int | None = checked(None, AT_LEAST_1)  # a fixed number of steps instead of epochs
    batch_size: int = checked(64, AT_LEAST_1)  # global batch (all ranks together)
    lr: float = checked(5e-4, NON_NEGATIVE)  # base lr, scaled by lr_scaling (DINO: 0.0005 x B / 256)
    # linear (DINO) | sqrt (DINOv2, base batch 1024) | none
    lr_scaling: str = checked("linear", OneOf(("linear", "sqrt", "none")))
    lr_base_batch: int = checked(256, AT_LEAST_1)
    min_lr: float = checked(1e-6, NON_NEGATIVE)
    warmup_epochs: float = checked(10.0, NON_NEGATIVE)
    weight_decay: float = checked(0.04, NON_NEGATIVE)  # cosine to weight_decay_end (DINO)
    weight_decay_end: float = checked(0.4, NON_NEGATIVE)
    clip_grad: float = checked(3.0, NON_NEGATIVE)  # max gradient norm; 0 disables
    # auto: the method's reference rule | param: each tensor alone (DINO, iBOT: utils.clip_gradients) | module:
    # backbone and each head alone (DINOv2: train.py) | global: one norm over all student parameters
    clip_mode: str = checked("auto", OneOf(("auto", "param", "module", "global")))
    # a schedule "epoch" of this many steps instead of a pass over the data (DINOv2: OFFICIAL_EPOCH_LENGTH 1250)
    epoch_length: int | None = checked(None, AT_LEAST_1)
    freeze_last_layer_epochs: float = checked(1.0, NON_NEGATIVE)
    # the epoch counts above are for a run this long; scaled to the run
    schedule_epochs: float | None = checked(100.0, POSITIVE)
    betas: tuple[float, float] = checked((0.9, 0.999), BELOW_1)
    # weight decay on biases and norms too (MoCo v2's SGD, MoCo v3's AdamW); else the method's reference rule
    decay_all: bool = checked(False, ANY)
    layerwise_decay: float = checked(1.0, FRACTION)  # DINOv2: 0.9
    patch_embed_lr_mult: float = checked(1.0, NON_NEGATIVE)  # DINOv2: 0.2


# a high-resolution or evaluation size must cover a patch, like the crops
SIZE_COVERS_PATCH = Needs(lambda v, c: v is None or c.backbone.arch not in VIT_ARCHS or v >= c.backbone.patch_size,
                           lambda c: f"at least backbone.patch_size = {c.backbone.patch_size}")


@dataclass
class HighresConfig:
    """DINOv2's high-resolution stage (Sec. 4, "Adapting the resolution"; 518 px for the last ~10k iterations):
    the last `steps` steps of the run take larger crops; the schedules run on unchanged. Like the epoch counts,
    `steps` is for a run of optim.schedule_epochs epochs and scaled to the run's length."""

    steps: int = checked(0, NON_NEGATIVE, Needs(lambda v, c: v == 0 or c.highres.global_size is not None,
                                                lambda c: "0 unless highres.global_size is set"))
    global_size: int | None = checked(None, AT_LEAST_1, SIZE_COVERS_PATCH)
    # None: crops.local_size scaled like the global crops, to a multiple of the patch
    local_size: int | None = checked(None, AT_LEAST_1, SIZE_COVERS_PATCH)
    batch_size: int | None = checked(None, AT_LEAST_1)  # None: optim.batch_size


@dataclass
class InitConfig:
    """Starting from pretrained weights (`--init-from`). A backbone without its heads (released weights, an
    export, another method's run) is continued in two phases (dinov2 issues #204, #431: fresh heads on a
    pretrained backbone collapse its k-NN): for `head_warmup_steps` the backbone is frozen, in the student and in
    the teacher alike, while the new heads (and DINO's centre) learn; then it trains with layer-wise lr decay, its
    lr ramping up from 0 over `warmup_steps`."""

    checkpoint: str | None = checked(None, NON_EMPTY)  # what --init-from loaded (saved: a resumed run keeps its phases)
    # auto: the whole method (heads, teachers) where the checkpoint is a run of the same method and shapes, else
    # the backbone with fresh heads; the resolved choice is saved
    mode: str = checked("auto", OneOf(("auto", "method", "backbone")))
    head_warmup_steps: int | None = checked(None, NON_NEGATIVE)  # None: 10 % of the run; 0: no frozen phase
    warmup_steps: int | None = checked(None, NON_NEGATIVE)  # the backbone's lr ramp after it; None: 5 % of the run
    # the backbone's block i trains at lr x decay^(depth - i) (DINOv2's 0.9); where optim.layerwise_decay is
    # set (DINOv2 recipes), that one holds
    layerwise_decay: float = checked(0.9, FRACTION)


def highres_crops(cfg: Config) -> CropsConfig | None:
    """The crops of the high-resolution stage: highres.global_size, and highres.local_size or the local crops
    scaled alike (DINOv2's 224 -> 518 takes 96 -> ~224), to a multiple of the patch."""
    h, c, patch = cfg.highres, cfg.crops, cfg.backbone.patch_size
    if not h.steps:
        return None
    local = h.local_size or max(patch, round(c.local_size * h.global_size / c.global_size / patch) * patch)
    return dataclasses.replace(c, global_size=h.global_size, local_size=local)



@dataclass
class TrainConfig:
    out: str | None = checked(None, NON_EMPTY)  # run folder; default runs/<method>-<arch>-<data>
    device: str = checked("auto", Pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"))  # auto: cuda if any
    seed: int = checked(0, Range(0, 2**32 - 1))
    precision: str = checked("fp32", OneOf(("fp32", "bf16")))  # bf16: autocast
    compile: bool = checked(False, ANY)
    # auto | flash | math | efficient: the scaled_dot_product_attention backend
    attention: str = checked("auto", OneOf(("auto", "flash", "math", "efficient")))
    log_every: int = checked(10, AT_LEAST_1)
    checkpoint_every: int = checked(0, NON_NEGATIVE)  # steps; 0: at epoch ends, at least 100 steps apart
    keep_last: int = checked(2, AT_LEAST_1)
    threads: int | None = checked(None, AT_LEAST_1)  # torch CPU threads; default: what torch chooses
    max_bad_steps: int = checked(10, AT_LEAST_1)  # stop after this many non-finite losses in a row
    # ddp | fsdp (FSDP2 fully_shard per transformer block) under torchrun
    distributed: str = checked("ddp", OneOf(("ddp", "fsdp")))
    time: str | None = checked(None, Duration())  # a wall-clock budget for the whole command: 90s, 10m, 2h, 1h30m
    # stop the run when the collapse watchdog fires, keeping the last good checkpoint
    stop_on_collapse: bool = checked(False, ANY)
    collapse_patience: int = checked(100, AT_LEAST_1)  # steps a collapse monitor must hold before the watchdog warns
    memory_fraction: float = checked(0.7, FRACTION)  # the share of the free memory a run may use for the batch
    memory_limit_gib: float | None = checked(None, POSITIVE)  # a cap on the process's memory, e.g. on a shared machine
    # scalars and k-NN results also to these (rank 0 only): [tensorboard, wandb, mlflow, csv] (training/loggers.py)
    loggers: tuple[str, ...] = checked((), EachOf(LOGGERS))


@dataclass
class EvalConfig:
    every: int = checked(0, NON_NEGATIVE)  # run k-NN every N steps during training (0: only at the end)
    k: int = checked(20, AT_LEAST_1)  # DINO's weighted k-NN
    temperature: float = checked(0.07, POSITIVE)
    final: bool = checked(True, ANY)  # k-NN of the teacher backbone, raw pixels and random init at the end
    # the evaluation images' size, also saved with the exported backbone; None: crops.global_size
    size: int | None = checked(None, AT_LEAST_1, SIZE_COVERS_PATCH)


def eval_size(cfg: Config) -> int:
    return cfg.eval.size or cfg.crops.global_size


@dataclass
class Config:
    method: str = checked("dino", OneOf(METHOD_NAMES))
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
    highres: HighresConfig = field(default_factory=HighresConfig)
    init: InitConfig = field(default_factory=InitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name, section in EXTRA_SECTIONS.items():  # sections of methods registered at run time
            setattr(self, name, section())


EXTRA_SECTIONS: dict[str, type] = {}  # register_section


def register_section(name: str, section: type) -> None:
    """The config section `name` of a method registered at run time (`selfsup.methods.register_method`): a
    dataclass whose keys are declared with `checked`, like the shipped sections."""
    if name in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"config section '{name}' exists already")
    leaves(section, name + ".")  # a key without a rule fails here
    EXTRA_SECTIONS[name] = section


def section_names(cfg: Any) -> list[str]:
    """The keys of a config dataclass; for a Config, with the registered sections."""
    return [f.name for f in dataclasses.fields(cfg)] + (list(EXTRA_SECTIONS) if isinstance(cfg, Config) else [])


# 1: every section saved, no version key, BYOL's and MoCo's EMA in `teacher`; 2: a run saves the shared sections
# and its method's own, BYOL's and MoCo's EMA in their sections (issue 14)
CONFIG_VERSION = 2
METHOD_SECTIONS = ("dino", "teacher", "simclr", "moco", "byol", "ibot", "dinov2", "distill")


def run_dict(cfg: Config, sections: tuple[str, ...]) -> dict:
    """What a run saves (config.yaml, checkpoints): its version, the shared sections and its method's own
    `sections` (Method.sections); a missing section reads back as its defaults."""
    own = (*METHOD_SECTIONS, *EXTRA_SECTIONS)
    kept = {k: v for k, v in to_dict(cfg).items() if k not in own or k in sections}
    return {"config_version": CONFIG_VERSION, **kept}


def upgraded(values: dict, where: str) -> dict:
    """A whole config (a saved run's, or a recipe) in today's layout. Version 1 (no version key) kept BYOL's
    target and MoCo's key-encoder momentum in `teacher`; they are now byol.momentum and moco.momentum."""
    values = dict(values)
    version = values.pop("config_version", 1)
    if version not in range(1, CONFIG_VERSION + 1):
        raise UserError(f"{where}: config_version {version!r} (this selfsup reads 1 to {CONFIG_VERSION}: a newer "
                        "selfsup wrote it)")
    method, teacher = values.get("method"), values.get("teacher")
    if version == 1 and method in ("byol", "moco") and isinstance(teacher, dict):
        ema = {k: teacher[k] for k in ("momentum", "momentum_end") if k in teacher}
        values["teacher"] = {k: v for k, v in teacher.items() if k not in ema}
        values[method] = {**(values.get(method) or {}), **ema}
    return values


def flat(d: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}: a nested config dict by dotted keys."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists) for YAML and checkpoints."""
    out = {}
    for name in section_names(cfg):
        v = getattr(cfg, name)
        out[name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
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
        if len(args) == 2 and args[1] is Ellipsis:  # a list of any length
            if not isinstance(value, (list, tuple)):
                raise UserError(f"{where}: bad value for '{key}': {value!r} (expected a list)")
            return tuple(_coerce(v, args[0], key, where) for v in value)
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
    if isinstance(cfg, Config):
        values = upgraded(values, where)
    hints = _hints(type(cfg)) | (EXTRA_SECTIONS if isinstance(cfg, Config) else {})
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in hints:
            known = ", ".join(section_names(cfg))
            raise UserError(f"{where}: unknown config key '{key}' (known here: {known})")
        current = getattr(cfg, k)
        if dataclasses.is_dataclass(current):
            apply(current, v, where, key + ".")
        else:
            setattr(cfg, k, _coerce(v, hints[k], key, where))



class Leaf(typing.NamedTuple):
    type: Any
    rules: tuple[Rule, ...]


def leaves(cls: type, prefix: str = "") -> dict[str, Leaf]:
    """Every leaf key of the config dataclass `cls`, dotted, with its type and rules; a key without rules is a bug."""
    out = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(leaves(tp, key + "."))
        elif "rules" in f.metadata:
            out[key] = Leaf(tp, f.metadata["rules"])
        else:
            raise TypeError(f"config key '{key}' has no rule: declare it with checked(default, rule)")
    return out


RULES = leaves(Config)


def _value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def validate(cfg: Config, only: set[str] | None = None) -> None:
    """Hold the resolved config to every key's type and rules (`only`: these keys' own rules, none across
    keys): a UserError names the first bad value."""
    # the types first (a config built in code skips `apply`), so that rules across keys compare numbers
    rules = dict(RULES)
    for name, section in EXTRA_SECTIONS.items():
        rules.update(leaves(section, name + "."))
    values = {key: _coerce(_value(cfg, key), leaf.type, key, "config") for key, leaf in rules.items()}
    for key, leaf in rules.items():
        value = values[key]
        if value is None or (only is not None and key not in only):  # None: the type allows it
            continue
        for rule in leaf.rules:
            if only is not None and isinstance(rule, Needs):
                continue
            expected = rule.expected(value, cfg)
            if expected:
                null = "null or " if type(None) in typing.get_args(leaf.type) else ""
                raise UserError(f"bad value for '{key}': {_show(value)} (expected {null}{expected})")


def parse_duration(text: str) -> float:
    """train.time in seconds: '90s' -> 90, '10m' -> 600, '1h30m' -> 5400, '1.5h' -> 5400, '2d' -> 172800."""
    seconds = _seconds(text)
    if seconds is None:
        raise UserError(f"bad value for 'train.time': {text!r} (expected {DURATION})")
    return seconds


def shipped_recipe(name: str) -> Path | None:
    """The recipe `name` among those shipped with selfsup or with a registered method."""
    return next((d / f"{name}.yaml" for d in RECIPE_DIRS if (d / f"{name}.yaml").exists()), None)


def recipe_path(name_or_path: str) -> Path:
    """A recipe by path, or by name among the recipes shipped with selfsup or a registered method."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    shipped = shipped_recipe(p.stem)
    if shipped is not None and p.parent == Path("."):
        return shipped
    names = ", ".join(sorted({r.stem for d in RECIPE_DIRS for r in d.glob("*.yaml")}))
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


def save(cfg: Config, path: Path, sections: tuple[str, ...] = METHOD_SECTIONS) -> None:
    path.write_text(yaml.safe_dump(run_dict(cfg, sections), sort_keys=False))


def from_dict(values: dict, where: str = "config") -> Config:
    cfg = Config()
    apply(cfg, values, where)
    return cfg
