"""What the benchmarks share (outside the package's __init__, which imports the pipeline benchmark):
synthetic RCN inputs."""

from __future__ import annotations

import torch
from torch import Tensor


def rcn_inputs(cfg, batch: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic binary images, labels and latent noise: the cost does not depend on the pixels."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x = (torch.rand(batch, m.in_channels, m.height, m.width, generator=g) > 0.6).float()
    y = torch.randint(0, m.n_classes, (batch,), generator=g)
    eps = torch.randn(batch, m.T, m.z_dim, generator=g)
    return x, y, eps
