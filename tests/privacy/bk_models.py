"""Models and inputs of the book-keeping engine's tests (`tests.privacy.test_bk`, `test_bk_patients`)."""

from __future__ import annotations

import timm
import torch
from timm.layers.norm import LayerNorm2d
from torch import nn


def LOSS(logits, targets):  # the per-sample multi-label BCE a trial trains with
    return nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


def convnext(name: str = "test_convnext", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A 1-channel, 5-label timm ConvNeXt with layer scales drawn in [0.5, 1.5] (timm's 1e-6 init would make
    every gradient behind a layer scale ~1e-6 and hide errors there)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=5, in_chans=1, drop_path_rate=0.0).to(dtype)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


def inputs(n: int = 4, size: int = 32, dtype: torch.dtype = torch.float32, seed: int = 1, channels: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g).to(dtype)
    return x, (torch.rand(n, 5, generator=g) > 0.5).to(dtype)


class MixedLayers(nn.Module):
    """Every supported layer kind outside ConvNeXt's own shapes: grouped/strided/dilated/padded convs on
    channels-last inputs, an overlapping dense conv (F.unfold path), Linear on 4-D and 2-D inputs, LayerNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, stride=2, padding=1, groups=2)  # 1 input, 3 outputs per group
        self.conv2 = nn.Conv2d(6, 8, 3, padding=2, dilation=2, groups=2, bias=False)  # 3 inputs, 4 outputs per group
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)  # dense, overlapping patches
        self.norm2d = LayerNorm2d(8)
        self.dw = nn.Conv2d(8, 16, 5, padding=2, groups=8)  # channel multiplier 2
        self.ln = nn.LayerNorm(16)
        self.fc4d = nn.Linear(16, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))  # channels-last strides
        x = self.dw(self.norm2d(self.conv3(self.conv2(x))))
        x = self.fc4d(self.ln(x.permute(0, 2, 3, 1)))  # [B, H, W, C] as in timm's ConvNeXt MLP
        return self.head(x.mean((1, 2)))
