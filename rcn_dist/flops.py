"""Model FLOPs per image, counted from the shapes a forward pass actually sees.

Forward hooks on the layers that do the arithmetic record 2 x multiply-adds from their input and
output shapes while the model runs once on the meta device (nothing is computed). Elementwise
work is left out; a training step is 3x the forward (docs/performance.md, "FLOPs per image").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rcn_dist.model import RCN
from rcn_dist.model.attention import Reader, Writer
from rcn_dist.model.capsules import RoutedCapsules

COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.LSTMCell, nn.GRUCell, RoutedCapsules, Reader, Writer)


def _layer_flops(mod: nn.Module, x: Tensor, out: Tensor) -> tuple[str, int]:
    """(kind, 2 x multiply-adds per image) of one call of a COUNTED layer on x."""
    if isinstance(mod, nn.Conv2d):  # bias ignored
        k, oh, ow = mod.kernel_size[0], out.shape[2], out.shape[3]
        return "conv", 2 * (mod.in_channels // mod.groups) * k * k * mod.out_channels * oh * ow
    if isinstance(mod, nn.ConvTranspose2d):  # every input pixel scatters a k x k patch
        k = mod.kernel_size[0]
        return "deconv", 2 * mod.in_channels * mod.out_channels * k * k * x.shape[2] * x.shape[3]
    if isinstance(mod, nn.Linear):
        rows = x.numel() // (x.shape[0] * mod.in_features)  # of one image
        return "linear", 2 * mod.in_features * mod.out_features * rows
    if isinstance(mod, (nn.LSTMCell, nn.GRUCell)):  # the two gate matmuls, 4 gates (LSTM) or 3 (GRU)
        gates = 4 if isinstance(mod, nn.LSTMCell) else 3
        return "rnn", 2 * (mod.input_size + mod.hidden_size) * gates * mod.hidden_size
    if isinstance(mod, RoutedCapsules):
        # Predictions u_hat = W u (n_child x n_parent transforms), then per iteration the weighted
        # sum s = c u_hat, and (all but the last) the agreement update b += u_hat . v.
        n_child, n_parent, parent_dim, child_dim = mod.weight.shape
        per_pass = 2 * n_parent * n_child * parent_dim
        return "routing", per_pass * child_dim + per_pass * (2 * mod.iters - 1)
    h, w, n = mod.h, mod.w, mod.n  # a Reader or a Writer
    if isinstance(mod, Reader):  # x and x_hat: Fy (N, H) img (H, W) Fx^T (W, N) per channel
        return "filterbank", 2 * x.shape[1] * (2 * n * h * w + 2 * n * w * n)
    # Writer: Fy^T (H, N) patch (N, N) Fx (N, W) per channel.
    return "filterbank", mod.c * (2 * h * n * n + 2 * h * n * w)


def count_forward(model: nn.Module, run: Callable[[nn.Module], object]) -> dict[str, int]:
    """Forward FLOPs per image by kind ({"conv", "deconv", "linear", "rnn", "routing", "filterbank",
    "total"}) while `run(model)` does one forward pass of batch 1 (on any device, meta included).

    Layers called T times (the decoder's) count T times. Layers inside a counted layer are not
    counted again (RoutedCapsules has no children; Reader/Writer's own Linear layers are counted
    as linear).
    """
    counts: dict[str, int] = {}

    def hook(mod: nn.Module, inputs: tuple, output: Tensor) -> None:
        kind, f = _layer_flops(mod, inputs[0], output)
        counts[kind] = counts.get(kind, 0) + f

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COUNTED)]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    counts["total"] = sum(counts.values())
    return counts


def rcn_flops(cfg) -> dict[str, int]:
    """Forward FLOPs per image of RCN(cfg) (a ModelConfig), counted on the meta device."""
    with torch.device("meta"):
        model = RCN(cfg)
        x = torch.zeros(1, cfg.in_channels, cfg.height, cfg.width)
        eps = torch.zeros(1, cfg.T, cfg.z_dim)
    return count_forward(model, lambda m: m(x, eps))


def train_flops_per_image(forward: dict[str, int]) -> int:
    """Training-step FLOPs per image: forward + backward = 3x the forward's (the backward computes
    input and weight grads)."""
    return 3 * forward["total"]
