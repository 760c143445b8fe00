"""Capsules (Sabour et al. 2017): squash, primary capsules, a routed capsule layer with dynamic routing."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from rcn_dist.model.precision import at_least_fp32


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s|, along `dim`.

    The paper prints s / |s|^2; Sabour et al. mean s / |s| (a unit vector), which is what this does.
    The norm is sqrt(|s|^2 + eps), so a zero vector maps to zero with a finite (zero) gradient
    instead of 0/0.
    """
    n2 = (s * s).sum(dim=dim, keepdim=True)
    # The whole scale on the small (..., 1) tensor: one full-size multiply instead of two.
    return s * (n2 / ((1.0 + n2) * torch.sqrt(n2 + eps)))


class PrimaryCapsules(nn.Module):
    """A convolution whose channels are cut into `types` capsules of `dim` each, then squashed.

    (B, in_ch, H, W) -> (B, types * h * w, dim), h, w the conv's output grid. The capsule index
    runs over (type, y, x) in that order.
    """

    def __init__(self, in_ch: int, types: int, dim: int, kernel: int, stride: int, bias: bool = True) -> None:
        super().__init__()
        self.types, self.dim = types, dim
        self.conv = nn.Conv2d(in_ch, types * dim, kernel, stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        u = self.conv(x)  # (B, types*dim, h, w)
        b, _, h, w = u.shape
        u = u.view(b, self.types, self.dim, h, w).permute(0, 1, 3, 4, 2)
        # Squash in fp32 also under bf16/fp16 autocast: |s|^2 in 8 bits of mantissa is too coarse.
        return squash(at_least_fp32(u.reshape(b, self.types * h * w, self.dim)))


def scaled_init_(trunk: nn.Module, primary: PrimaryCapsules) -> None:
    """Initialise a capsule network so that signal reaches its routed capsules (``caps_init="scaled"``,
    docs/model.md item 10).

    trunk: the ReLU (or tanh) stack before the primary capsules (Linear, Conv2d, ConvTranspose2d
    layers). He-normal weights keep the second moment of unit-scale inputs through each layer, and
    zero biases add no image-independent part. The primary convolution then gives each capsule a
    pre-squash length of about one, where the squash has its largest slope; PyTorch's defaults
    leave the capsules in its flat part, passing neither signal nor gradient.
    """
    act = "tanh" if any(isinstance(m, nn.Tanh) for m in trunk.modules()) else "relu"
    for mod in trunk.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            # ConvTranspose2d's weight (in, out, k, k): an output sums in * k * k inputs, torch's fan_out.
            mode = "fan_out" if isinstance(mod, nn.ConvTranspose2d) else "fan_in"
            nn.init.kaiming_normal_(mod.weight, mode=mode, nonlinearity=act)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    conv = primary.conv
    fan_in = conv.weight[0].numel()
    # |u|^2 = dim * fan_in * std^2 * E[x^2] with E[x^2] ~ 1 after the He-initialised layers.
    nn.init.normal_(conv.weight, std=1.0 / (fan_in * primary.dim) ** 0.5)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def dynamic_routing(u_hat: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Routing by agreement (Sabour et al., Procedure 1).

    u_hat: (B, n_parent, n_child, dim), the prediction u_hat(j|i) of child i for parent j, stored
    parent-major so that both contractions below are plain batched matmuls over (B, n_parent)
    without copying u_hat. Returns v (B, n_parent, dim) and the final couplings
    c (B, n_parent, n_child).

    The couplings are a softmax over the PARENTS j (dim 1) for each child i: each child distributes
    its vote. The logits b start at 0, so with iters = 1 every c_ij = 1 / n_parent. The logit
    updates b += u_hat . v use a detached u_hat: gradients flow only through the last iteration's
    s_j = sum_i c_ij u_hat(j|i), not back through the routing history.
    """
    b = u_hat.new_zeros(u_hat.shape[:3])  # (B, n_parent, n_child)
    u_detached = u_hat.detach()
    for r in range(iters):
        c = torch.softmax(b, dim=1)
        last = r == iters - 1
        s = (c.unsqueeze(2) @ (u_hat if last else u_detached)).squeeze(2)  # (B, n_parent, dim)
        v = squash(s)
        if not last:
            b = b + (u_detached @ v.unsqueeze(3)).squeeze(3)
    return v, c


class RoutedCapsules(nn.Module):
    """A fully connected capsule layer: n_child capsules of child_dim -> n_parent of parent_dim.

    Each (child, parent) pair has its own transform W_ij (parent_dim x child_dim);
    u_hat(j|i) = W_ij u_i is computed once as one batched contraction, then routed.
    """

    def __init__(self, n_child: int, child_dim: int, n_parent: int, parent_dim: int, iters: int) -> None:
        super().__init__()
        self.iters = iters
        # Scale so that the initial s_j (a mean of n_child votes over n_parent parents, with unit-ish
        # child capsules) has length O(1): the squash is then neither saturated nor flat at zero.
        std = n_parent / math.sqrt(n_child * parent_dim)
        self.weight = nn.Parameter(torch.randn(n_child, n_parent, parent_dim, child_dim) * std)

    def predictions(self, u: Tensor) -> Tensor:
        """u (B, n_child, child_dim) -> u_hat (B, n_parent, n_child, parent_dim)."""
        return torch.einsum("ijdk,bik->bjid", self.weight, u.to(self.weight.dtype))

    def forward(self, u: Tensor) -> Tensor:
        """u (B, n_child, child_dim) -> v (B, n_parent, parent_dim), routed in fp32 or fp64.

        The predictions follow autocast (bf16 on the matmul units); the routing itself runs in
        fp32 with autocast off: its logits b sum agreements over iterations and the softmax over
        parents is sensitive to them.
        """
        u_hat = self.predictions(u)
        # The meta device (used to count FLOPs) has no autocast to switch off.
        device = u_hat.device.type
        with contextlib.nullcontext() if device == "meta" else torch.autocast(device, enabled=False):
            v = dynamic_routing(at_least_fp32(u_hat), self.iters)[0]
        # Back to the weights' dtype: fp32 under autocast (no-op), bf16 where the whole module
        # was cast to bf16 (DeepSpeed's bf16 mode), so the next layer gets its own dtype.
        return v.to(self.weight.dtype)

