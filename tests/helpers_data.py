"""User data-set factories for data tests, importable as ``tests.helpers_data:<name>``."""

from __future__ import annotations

import torch

__all__ = ["make_data", "make_bad_data"]


def make_data(n: int = 60, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` single-channel ``size x size`` images (N, H, W) of 3 classes, 20 each by default."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, size, size, generator=generator)
    labels = torch.arange(n) % 3
    return images, labels


def make_bad_data() -> dict[str, int]:
    """Returns something ``load_dataset`` cannot use."""
    return {"images": 1}
