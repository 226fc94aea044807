"""iBOT: image BERT pre-training with an online tokenizer (Zhou et al., 2022) = DINO + masked image modelling."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, CropsConfig
from ..data.masking import BlockMasking, DINOv2Masking
from ..nn import feature_dim
from ..nn.heads import DINOHead
from .schedule import Progress, Schedule
from .base import Batch
from .dino import DINO, centred_sharpened, dino_loss, entropy, update_center


def masked_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                      student_temp: float) -> torch.Tensor:
    """L_MIM (iBOT Eq. 2): -sum_i m_i P_t(u_i) log P_s(u^_i) over the masked patches of each crop, averaged over
    that crop's masked patches, then over all crops (an unmasked crop adds 0), as iBOT's and DINOv2's code.
    `student_logits` / `teacher_probs` [M, K] are the masked patches in the row-major order of `masks` [n, N]."""
    ce = torch.sum(-teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1)
    per_crop = (1.0 / masks.sum(1).clamp_min(1).to(ce.dtype)).unsqueeze(1).expand_as(masks)[masks]
    return (ce * per_crop).sum() / masks.shape[0]


class IBOT(DINO):
    """The student sees masked global crops (the mask token replaces masked patch embeddings), the teacher the
    same crops whole. L = L_[CLS] (DINO over all crop pairs) + L_MIM (same view, masked patches only), with the
    patch tokens' own centre and temperature. One head for [CLS] and patches (iBOT), or untied heads."""

    name = "ibot"
    sections = ("dino", "teacher", "ibot")
    masking_rule = "ibot"  # ibot.masking=auto: whose masking rule (bytedance/ibot loader.py ImageFolderMask)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        i = cfg.ibot
        self.register_buffer("center_patch", torch.zeros(1, i.head_n_prototypes if i.separate_head else cfg.dino.out_dim))

    def build_student(self) -> nn.ModuleDict:
        student = super().build_student()
        i = self.cfg.ibot
        if i.separate_head:
            student["ibot_head"] = DINOHead(feature_dim(student["backbone"]), i.head_n_prototypes, i.head_hidden_dim,
                                            i.head_bottleneck_dim, i.head_n_layers, self.cfg.dino.norm_last_layer)
        return student

    @staticmethod
    def patch_head(net: nn.ModuleDict) -> nn.Module:
        return net["ibot_head"] if "ibot_head" in net else net["head"]

    def schedules(self) -> dict[str, Schedule]:
        """DINO's, and the patch tokens' own teacher temperature, warmed up like the [CLS] one (main_ibot.py
        iBOTLoss.teacher_temp2_schedule, over --warmup_teacher_patch_temp_epochs = the [CLS] warm-up)."""
        i = self.cfg.ibot
        return {**super().schedules(), "patch_temp": Schedule(i.teacher_temp, warmup_start=i.warmup_teacher_temp,
                                                               warmup_epochs=self.cfg.teacher.warmup_temp_epochs,
                                                               shape="constant")}

    def last_layer_params(self) -> list[nn.Parameter]:
        extra = list(self.student["ibot_head"].last_layer.parameters()) if "ibot_head" in self.student else []
        return super().last_layer_params() + extra

    def masking(self, crops: CropsConfig | None = None) -> Callable | None:
        """The global crops' mask generator by ibot.masking (auto: this method's own rule)."""
        i, c = self.cfg.ibot, crops or self.cfg.crops
        size = c.global_size
        if i.mask_sample_probability <= 0:
            return None
        patch = self.cfg.backbone.patch_size
        grid = (size // patch, size // patch)
        if (self.masking_rule if i.masking == "auto" else i.masking) == "ibot":
            return BlockMasking(grid, c.n_global, i.mask_sample_probability, i.mask_ratio_min_max, i.mask_min_aspect)
        # dinov2 train.py: max_num_patches = 0.5 * img_size // patch_size * img_size // patch_size
        return DINOv2Masking(grid, c.n_global, i.mask_sample_probability, i.mask_ratio_min_max, i.mask_min_aspect,
                             min_block=4, max_block=(0.5 * size // patch) * size // patch)

    # ----- the teacher's targets: centring + sharpening here, Sinkhorn-Knopp in DINOv2 -----
    def teacher_probs(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        return centred_sharpened(logits, center, temp)

    def teacher_patch_logits(self, patch_tokens: torch.Tensor, positions: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the teacher's patch logits at `positions` [M, K], the logits its patch centre is updated from).
        iBOT (main_ibot.py, iBOTLoss.update_center): the head runs on every patch token and the centre is the
        mean over all of them, masked or not."""
        n, n_patches, dim = patch_tokens.shape
        logits = self.patch_head(self.teacher)(patch_tokens.reshape(n * n_patches, dim)).reshape(n, n_patches, -1)
        return logits[positions], logits

    def update_centers(self, cls_logits: torch.Tensor, patch_logits: torch.Tensor) -> None:
        """After the loss: the [CLS] centre from the teacher's [CLS] logits, the patch centre from the rows
        `teacher_patch_logits` chose (iBOT: every patch; the mean over them all, every rank counting alike)."""
        update_center(self.center, cls_logits, self.cfg.dino.center_momentum)
        update_center(self.center_patch, patch_logits, self.cfg.ibot.center_momentum)

    def regularisers(self, student_global_cls: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra weighted losses on the student's global-crop [CLS] tokens (DINOv2's KoLeo)."""
        return {}

    def loss_positions(self, batch: Batch, unmasked: bool = False) -> torch.Tensor:
        """Patches the MIM loss applies to, [n_global * B, N]: the masked ones; without masks, none (or all,
        with `unmasked`)."""
        if batch.masks is not None:
            return batch.masks.flatten(1)
        x = batch.global_crops
        n_patches = (x.shape[-2] // self.cfg.backbone.patch_size) * (x.shape[-1] // self.cfg.backbone.patch_size)
        return torch.full((x.shape[0], n_patches), unmasked, dtype=torch.bool, device=x.device)

    def forward(self, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        i, d = self.cfg.ibot, self.cfg.dino
        positions = self.loss_positions(batch)
        with torch.no_grad():  # the teacher sees the global crops unmasked
            t = self.teacher["backbone"].forward_features(batch.global_crops)
            t_cls = self.teacher["head"](t["x_norm_clstoken"])
            t_patch, t_patch_for_center = self.teacher_patch_logits(t["x_norm_patchtokens"], positions)
            p_cls = self.teacher_probs(t_cls, self.center, progress.teacher_temp)
            p_patch = self.teacher_probs(t_patch, self.center_patch, progress.patch_temp)
        crops = [batch.global_crops] + ([batch.local_crops] if batch.local_crops is not None else [])
        student_masks = [batch.masks] + [None] * (len(crops) - 1)
        outs = self.student["backbone"].forward_features_list(crops, student_masks)
        s_cls_tokens = torch.cat([o["x_norm_clstoken"] for o in outs])
        s_cls = self.student["head"](s_cls_tokens).chunk(batch.n_global + batch.n_local)
        s_patch = self.patch_head(self.student)(outs[0]["x_norm_patchtokens"][positions])
        loss_cls = dino_loss(list(s_cls), list(p_cls.chunk(batch.n_global)), d.student_temp)
        loss_mim = masked_patch_loss(s_patch, p_patch, positions, d.student_temp)
        self.update_centers(t_cls, t_patch_for_center)
        extra = self.regularisers(s_cls_tokens[: batch.global_crops.shape[0]])
        loss = d.loss_weight * loss_cls + i.loss_weight * loss_mim + sum(extra.values())
        h = entropy(p_cls)
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_mim": loss_mim.detach(), "teacher_entropy": h,
                "kl": loss_cls.detach() - h, "masked_share": positions.float().mean(),
                **{k: v.detach() for k, v in extra.items()}}
