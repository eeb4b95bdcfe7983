"""Small user-defined models for the tests: a CNN and a ViT written without torchvision or timm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """Stem, a residual block, a channel concatenation, a depthwise conv, and a flatten into the classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.res = nn.Sequential(
            nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
        )
        self.left = nn.Conv2d(16, 8, 1)
        self.right = nn.Conv2d(16, 12, 3, padding=1, stride=1)
        self.dw = nn.Conv2d(20, 20, 3, padding=1, groups=20)
        self.bn1 = nn.BatchNorm2d(20)
        self.fc = nn.Linear(20 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.res(x))
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        y = self.bn1(self.dw(y)).relu()
        y = F.adaptive_avg_pool2d(y, 2).flatten(1)
        return self.fc(y)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Patch embedding, class token, position embedding, ``nn.MultiheadAttention`` blocks, mean pooling."""

    def __init__(self, img_size: int = 16, patch: int = 4, dim: int = 32, depth: int = 2, heads: int = 4,
                 hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


class SortsChannels(nn.Module):
    """A model with an op mdprune cannot follow (a sort across channels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.odd = OddOp()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.odd(self.conv(x))
        return self.fc(x.mean((2, 3)))


class OddOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, dim=1).values


def sorts_channels(num_classes: int = 10, in_chans: int = 1) -> SortsChannels:
    m = SortsChannels()
    m.conv = nn.Conv2d(in_chans, 8, 3)
    m.fc = nn.Linear(8, num_classes)
    return m


def tiny_cnn(num_classes: int = 10) -> TinyCNN:
    return TinyCNN(num_classes)


def tiny_vit(**kwargs: int) -> TinyViT:
    return TinyViT(**kwargs)
