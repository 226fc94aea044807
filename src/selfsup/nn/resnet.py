"""ResNet (He et al. 2016), v1.5 (stride in the 3x3 conv), as torchvision builds it and DINO releases it.

Module names are torchvision's (`conv1`, `bn1`, `layer{1..4}.{i}.conv{1,2,3}`, `downsample.{0,1}`), so DINO's
ResNet-50 weights load by their own keys. The backbone has no `fc`: it returns the globally pooled features,
`embed_dim` wide. The CIFAR stem (SimCLR Appendix B.9) is a 3x3 stride-1 conv and no max-pool, for small images.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import UserError


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, width, 3, stride)
        self.conv2, self.bn2 = _conv_bn(width, width, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, width * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride: v1.5), 1x1 expand by 4 (ResNet-50/101)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, width * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, width * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    """Projection shortcut (1x1 conv + BN) where the shape changes, identity elsewhere."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))


# name -> (block, blocks per stage) (He et al. Table 1)
RESNETS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], cifar_stem: bool = False,
                 in_chans: int = 3):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_chans, 64, 3, 1) if cifar_stem else _conv_bn(in_chans, 64, 7, 2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, padding=1)
        c = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(c, width, 2 if i > 0 and j == 0 else 1))
                c = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.embed_dim = c
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output [B, embed_dim, H/32, W/32] (H/8 with the CIFAR stem)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The ViT interface: the pooled feature stands in for [CLS], the feature map's cells for patches."""
        if masks is not None:
            raise ValueError("a ResNet takes no patch masks")
        fmap = self.feature_map(x)
        return {"x_norm_clstoken": fmap.mean((2, 3)), "x_norm_patchtokens": fmap.flatten(2).transpose(1, 2)}

    def forward_features_list(self, xs: list[torch.Tensor], masks: list[None]) -> list[dict[str, torch.Tensor]]:
        """Groups of crops of different sizes (DINO's multi-crop), one forward each."""
        return [self.forward_features(x, m) for x, m in zip(xs, masks)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features [B, embed_dim] (torchvision's model up to, not including, `fc`)."""
        return self.feature_map(x).mean((2, 3))


def resnet(name: str, cifar_stem: bool = False, in_chans: int = 3) -> ResNet:
    if name not in RESNETS:
        raise UserError(f"unknown backbone '{name}' (expected one of: {', '.join(RESNETS)})")
    block, layers = RESNETS[name]
    return ResNet(block, layers, cifar_stem, in_chans)
