"""Model FLOPs per image, counted from the shapes a forward pass actually sees.

Forward hooks on the layers that do the arithmetic record 2 x multiply-adds from their input and
output shapes while the model runs once on the meta device (nothing is computed). Elementwise
work is left out; a training step is 3x the forward (docs/performance.md, "FLOPs per image").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rcn_dist.model.attention import Reader, Writer
from rcn_dist.model.capsules import RoutedCapsules

TRAIN_FACTOR = 3
"""Forward + backward = 3x the forward's FLOPs (the backward computes input and weight grads)."""


def conv2d_flops(in_ch: int, out_ch: int, kernel: int, out_h: int, out_w: int, groups: int = 1) -> int:
    """2 x MACs of a 2-D convolution per image (bias ignored)."""
    return 2 * (in_ch // groups) * kernel * kernel * out_ch * out_h * out_w


def deconv2d_flops(in_ch: int, out_ch: int, kernel: int, in_h: int, in_w: int) -> int:
    """2 x MACs of a transposed convolution per image: every input pixel scatters a k x k patch."""
    return 2 * in_ch * out_ch * kernel * kernel * in_h * in_w


def routing_flops(n_child: int, child_dim: int, n_parent: int, parent_dim: int, iters: int) -> int:
    """Predictions u_hat = W u (n_child x n_parent transforms), then per iteration the weighted sum
    s = c u_hat, and (all but the last) the agreement update b += u_hat . v."""
    pred = 2 * n_child * n_parent * parent_dim * child_dim
    per_pass = 2 * n_parent * n_child * parent_dim
    return pred + per_pass * (2 * iters - 1)


def rnn_cell_flops(n_in: int, hidden: int, gates: int) -> int:
    """The two gate matmuls of an LSTM (gates = 4) or GRU (gates = 3) cell."""
    return 2 * (n_in + hidden) * gates * hidden


def read_flops(channels: int, height: int, width: int, n: int) -> int:
    """DRAW read of x and x_hat: Fy (N, H) img (H, W) Fx^T (W, N) per channel, two images."""
    return 2 * channels * (2 * n * height * width + 2 * n * width * n)


def write_flops(channels: int, height: int, width: int, n: int) -> int:
    """DRAW write: Fy^T (H, N) patch (N, N) Fx (N, W) per channel."""
    return channels * (2 * height * n * n + 2 * height * n * width)


def _hook(counts: dict[str, int]) -> Callable[[nn.Module, tuple, object], None]:
    def count(mod: nn.Module, inputs: tuple, output: object) -> None:
        x = inputs[0]
        b = x.shape[0]
        if isinstance(mod, nn.Conv2d):
            _, _, oh, ow = output.shape  # type: ignore[union-attr]
            f = conv2d_flops(mod.in_channels, mod.out_channels, mod.kernel_size[0], oh, ow, mod.groups)
            key = "conv"
        elif isinstance(mod, nn.ConvTranspose2d):
            f = deconv2d_flops(mod.in_channels, mod.out_channels, mod.kernel_size[0], x.shape[2], x.shape[3])
            key = "deconv"
        elif isinstance(mod, nn.Linear):
            f = 2 * mod.in_features * mod.out_features * (x.numel() // (b * mod.in_features))
            key = "linear"
        elif isinstance(mod, (nn.LSTMCell, nn.GRUCell)):
            gates = 4 if isinstance(mod, nn.LSTMCell) else 3
            f = rnn_cell_flops(mod.input_size, mod.hidden_size, gates)
            key = "rnn"
        elif isinstance(mod, RoutedCapsules):
            n_child, n_parent, parent_dim, child_dim = mod.weight.shape
            f = routing_flops(n_child, child_dim, n_parent, parent_dim, mod.iters)
            key = "routing"
        elif isinstance(mod, Reader):
            f = read_flops(x.shape[1], mod.h, mod.w, mod.n)
            key = "filterbank"
        elif isinstance(mod, Writer):
            f = write_flops(mod.c, mod.h, mod.w, mod.n)
            key = "filterbank"
        else:
            return
        counts[key] = counts.get(key, 0) + f

    return count


COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.LSTMCell, nn.GRUCell, RoutedCapsules, Reader, Writer)


def count_forward(model: nn.Module, run: Callable[[nn.Module], object]) -> dict[str, int]:
    """Forward FLOPs per image by kind ({"conv", "deconv", "linear", "rnn", "routing", "filterbank",
    "total"}) while `run(model)` does one forward pass of batch 1 (on any device, meta included).

    Layers called T times (the decoder's) count T times. Layers inside a counted layer are not
    counted again (RoutedCapsules has no children; Reader/Writer's own Linear layers are counted
    as linear).
    """
    counts: dict[str, int] = {}
    handles = [m.register_forward_hook(_hook(counts)) for m in model.modules() if isinstance(m, COUNTED)]
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
    from rcn_dist.model import RCN

    with torch.device("meta"):
        model = RCN(cfg)
        x = torch.zeros(1, cfg.in_channels, cfg.height, cfg.width)
        eps = torch.zeros(1, cfg.T, cfg.z_dim)

    def run(m: nn.Module) -> Tensor:
        return m(x, eps).canvas

    return count_forward(model, run)


def train_flops_per_image(forward: dict[str, int] | int) -> int:
    """Training-step FLOPs per image from forward FLOPs (x TRAIN_FACTOR)."""
    total = forward["total"] if isinstance(forward, dict) else forward
    return TRAIN_FACTOR * total
