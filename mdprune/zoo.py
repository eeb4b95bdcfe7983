"""Small built-in models for small images (the demo and the benchmarks on Fashion-MNIST).

- ``small_resnet18``: torchvision's ResNet-18 blocks at a width multiplier, with a 3x3 stem and no max-pool,
  for 28x28 or 32x32 inputs (width 0.25: 16/32/64/128 channels).
- ``small_vit``: a timm ``VisionTransformer`` with a small patch size for small images.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


class SmallResNet(ResNet):
    """ResNet with a 3x3 stride-1 stem and no max-pool, for small images."""

    def __init__(self, layers: list[int], width: float = 0.25, num_classes: int = 10, in_chans: int = 1):
        widths = [max(8, int(round(w * width))) for w in (64, 128, 256, 512)]
        super().__init__(BasicBlock, layers, num_classes=num_classes)
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], layers[3], stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        self.default_input_size = (28, 28)  # Fashion-MNIST; any size works
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def small_resnet18(width: float = 0.25, num_classes: int = 10, in_chans: int = 1) -> SmallResNet:
    """ResNet-18 for small images (``width`` scales every stage's channels)."""
    return SmallResNet([2, 2, 2, 2], width, num_classes, in_chans)


def small_vit(img_size: int = 28, patch_size: int = 4, embed_dim: int = 96, depth: int = 6, num_heads: int = 3,
              mlp_ratio: float = 4.0, num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """A ViT for small images (timm's ``VisionTransformer``; 28x28 with 4x4 patches: 49 tokens + class)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                             class_token=True, global_pool="token")


ZOO = {"small_resnet18": small_resnet18, "small_vit": small_vit}
