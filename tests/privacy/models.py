"""The small model, inputs and loss the DP engine tests share (not a test module)."""

import timm
import torch


def small_convnext(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("test_convnext", num_classes=5, in_chans=1, drop_path_rate=0.0)


def inputs(n: int = 6, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), (torch.rand(n, 5, generator=g) > 0.5).float()


def LOSS(logits, targets):  # the per-sample multi-label BCE a trial trains with
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
