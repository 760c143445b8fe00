"""Capsules (Sabour et al. 2017): squash, primary capsules, a routed capsule layer with dynamic routing."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rcn_dist.model.precision import at_least_fp32, autocast_dtype, cast_to, no_autocast

SQUASH_EPS = 1e-8
"""The squash's norm is sqrt(|s|^2 + SQUASH_EPS): finite, with a zero gradient, at s = 0."""


def squash(s: Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s|, along `dim`.

    The paper prints s / |s|^2; Sabour et al. mean s / |s| (a unit vector), which is what this does.
    The norm is sqrt(|s|^2 + eps), so a zero vector maps to zero with a finite (zero) gradient
    instead of 0/0. This is the readable form, differentiated by autograd; the layers below run
    `_squash_parts` / `_squash_backward`, the same arithmetic with its backward written out.
    """
    n2 = (s * s).sum(dim=dim, keepdim=True)
    # The whole scale on the small (..., 1) tensor: one full-size multiply instead of two.
    return s * (n2 / ((1.0 + n2) * torch.sqrt(n2 + eps)))


def _norm2_root(s: Tensor) -> tuple[Tensor, Tensor]:
    """n2 = |s|^2 along the last dim and r = sqrt(n2 + SQUASH_EPS), each (..., 1)."""
    n2 = torch.linalg.vecdot(s, s).unsqueeze(-1)
    return n2, torch.sqrt(n2 + SQUASH_EPS)


def _squash_parts(s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """squash(s) along the last dim, and what its backward needs: (v, n2, r, a, k) with
    n2 = |s|^2, r = sqrt(n2 + eps), a = 1 / ((1 + n2) r) and k = n2 a, each (..., 1): v = s k."""
    n2, r = _norm2_root(s)
    a = torch.reciprocal(torch.addcmul(r, n2, r))  # 1 / ((1 + n2) r), (1 + n2) r as r + n2 r: one op
    k = n2 * a
    return s * k, n2, r, a, k


def _squash_scale(s: Tensor) -> Tensor:
    """squash(s)'s scale k = n2 / ((1 + n2) sqrt(n2 + eps)), (..., 1), n2 = |s|^2 along the last
    dim: v = s k. For the routing's inner iterations, which need u_hat . v = k (u_hat . s) only."""
    n2, r = _norm2_root(s)
    return n2 / torch.addcmul(r, n2, r)


def _squash_backward(dv: Tensor, s: Tensor, n2: Tensor, r: Tensor, a: Tensor, k: Tensor) -> Tensor:
    """d loss / d s of v = s k(n2): ds = k dv + 2 k'(n2) (dv . s) s, where
    2 k' = (n2 - n2^2 + 2 eps) a^2 / r (finite at s = 0, where it multiplies s = 0)."""
    dot = torch.linalg.vecdot(dv, s).unsqueeze(-1)  # (..., 1)
    k2 = torch.addcmul(n2 + 2 * SQUASH_EPS, n2, n2, value=-1.0) * (a.square() / r)  # 2 k'
    return torch.addcmul(dv * k, s, dot * k2)


class _SquashFn(torch.autograd.Function):
    """squash along the last dim, fp32 at least, with the backward written out: autograd's graph
    of the six ops costs about a dozen more in the backward, at every drawing step."""

    @staticmethod
    def forward(ctx, s):
        v, *parts = _squash_parts(s)
        ctx.save_for_backward(s, *parts)
        return v

    @staticmethod
    def backward(ctx, dv):
        return _squash_backward(dv, *ctx.saved_tensors)


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
        u = at_least_fp32(u.reshape(b, self.types * h * w, self.dim))
        with no_autocast(u.device):
            return _SquashFn.apply(u)


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
        parents is sensitive to them. Predictions, routing and squash run as one autograd
        Function (`_RoutedFn`): `dynamic_routing`'s arithmetic with the backward written out.
        """
        dtype = autocast_dtype(u.device, self.weight.dtype)  # what the einsum would run in
        with no_autocast(u.device):
            v = _RoutedFn.apply(u, self.weight, self.iters, dtype)
        # Back to the weights' dtype: fp32 under autocast (no-op), bf16 where the whole module
        # was cast to bf16 (DeepSpeed's bf16 mode), so the next layer gets its own dtype.
        return cast_to(v, self.weight.dtype)


class _RoutedFn(torch.autograd.Function):
    """(u (B, n_child, child_dim), W (n_child, n_parent, parent_dim, child_dim)) -> v (B, n_parent,
    parent_dim): the predictions u_hat = W u in `dtype` (the weights' or autocast's), then
    dynamic_routing(u_hat, iters) in fp32 at least, as one Function.

    The same arithmetic as `predictions` then `dynamic_routing`, but for the first iteration:
    b = 0 gives c = 1 / n_parent exactly, so s = sum_i u_hat / n_parent without the softmax.
    Autograd's graph of the routing costs about 95 ops per drawing step (views and broadcasts of
    every iteration); the backward here is a few: only the last iteration carries gradient
    (dynamic_routing's detached u_hat), so du_hat = c ds, then two einsums for dW and du.
    """

    @staticmethod
    def forward(ctx, u, weight, iters, dtype):
        u_c, w_c = cast_to(u, dtype), cast_to(weight, dtype)
        u_hat = at_least_fp32(torch.einsum("ijdk,bik->bjid", w_c, u_c))  # (B, P, N, D)
        n_parent = u_hat.shape[1]
        c = logits = None
        s = u_hat.sum(2) * (1.0 / n_parent)  # (B, P, D): iteration 1, c = 1 / n_parent
        for r in range(iters):
            if logits is not None:
                c = torch.softmax(logits, dim=1)  # (B, P, N)
                s = torch.einsum("bji,bjid->bjd", c, u_hat)
            if r < iters - 1:
                # b += u_hat . v (no gradient: dynamic_routing's detached u_hat), as k (u_hat . s)
                # with v = k s: the inner iterations need only the squash's scale k (B, P, 1), and
                # the sum and the scaling are one addcmul.
                k = _squash_scale(s)
                agree = torch.einsum("bjid,bjd->bji", u_hat, s)  # (B, P, N), before k
                logits = agree * k if logits is None else torch.addcmul(logits, agree, k)
            else:
                v, *parts = _squash_parts(s)
        ctx.save_for_backward(u_c, w_c, c, s, *parts)
        ctx.dtypes, ctx.n_parent = (u.dtype, weight.dtype), n_parent
        ctx.set_materialize_grads(False)
        return v

    @staticmethod
    def backward(ctx, dv):
        if dv is None:
            return None, None, None, None
        u_c, w_c, c, s, *parts = ctx.saved_tensors
        ds = _squash_backward(dv, s, *parts)  # (B, P, D), fp32 at least
        if c is None:  # one iteration: c = 1 / n_parent
            du_hat = (ds * (1.0 / ctx.n_parent)).unsqueeze(2).expand(-1, -1, u_c.shape[1], -1)
        else:
            du_hat = torch.einsum("bji,bjd->bjid", c, ds)  # (B, P, N, D): the outer product, one mul
        du_hat = cast_to(du_hat, w_c.dtype)
        du = dw = None
        if ctx.needs_input_grad[0]:
            du = cast_to(torch.einsum("ijdk,bjid->bik", w_c, du_hat), ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            dw = cast_to(torch.einsum("bjid,bik->ijdk", du_hat, u_c), ctx.dtypes[1])
        return du, dw, None, None
