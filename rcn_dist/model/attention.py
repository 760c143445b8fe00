"""DRAW's Gaussian-filterbank attention (Gregor et al. 2015, section 3.2).

Coordinates follow the DRAW paper: an image A pixels wide and B high has its pixel centres at
x = 1..A and y = 1..B, so the array column `a` (0-based) sits at x = a + 1. The window centre
(gx, gy), the stride delta and the variance sigma2 are in those pixel units; gamma is the intensity.

Precision: the window parameters, the filterbanks, the glimpses and the write run in fp32 at least
whatever the dtype of the window and patch layers (a bf16- or fp16-held model). In fp16 the
exponent -(a - mu)^2 / (2 sigma2) of a window off the image overflows to -inf, and a row of -inf
is NaN after the softmax; in bf16 a filter row has 3 significant digits.

Two forms of the same arithmetic. The functions (`window_params`, `filterbank`, `read_glimpse`,
`write_patch`) are the readable one, differentiated by autograd. `Reader` and `Writer` run each
drawing step's whole attention (window, filterbanks, read or write) as one autograd Function whose
backward is written out: autograd's own graph of those ops costs about 250 ops per drawing step
(views, broadcasts and reductions of the filterbank's softmax, einsum's permutes), the written
backward a few dozen. tests/test_ops.py holds both to the functions of the first release, values
and gradients; docs/performance.md has the counts.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from rcn_dist.model.cells import Linear
from rcn_dist.model.precision import at_least_fp32, cast_to, no_autocast

SIGMA2_FLOOR = 1e-6
"""sigma2 is floored here (pixel^2, already a one-pixel window): the filterbank's logits and their
gradients stay finite in fp32 and bf16."""


# ------------------------------------------------------------------ the functions
@functools.lru_cache(maxsize=64)
def _positions(n: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The filter offsets i - N/2 - 0.5 (i = 1..N) as a column (N, 1), and the pixel positions
    1..length, (length,): constants of a geometry, made once per device and dtype (not two arange
    ops a step), shaped to broadcast into a bank's (..., N, length)."""
    offs = torch.arange(1, n + 1, device=device, dtype=dtype) - (n / 2 + 0.5)
    return offs.view(n, 1), torch.arange(1, length + 1, device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _affine(height: int, width: int, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """scale and shift (5, 1, 1) with (gx, gy, log sigma2, log delta, log gamma) = shift + scale * p,
    shaped to broadcast against p (B, 5, 1, 1)."""
    k = math.log((max(height, width) - 1) / max(n - 1, 1))
    scale = torch.tensor([(width + 1) / 2, (height + 1) / 2, 1.0, 1.0, 1.0], device=device, dtype=dtype)
    shift = torch.tensor([(width + 1) / 2, (height + 1) / 2, 0.0, k, 0.0], device=device, dtype=dtype)
    return scale.view(5, 1, 1), shift.view(5, 1, 1)


def _window_parts(p: Tensor, height: int, width: int, n: int) -> tuple[Tensor, Tensor]:
    """p (B, 5) raw -> (centres (B, 2, 1, 1): gx, gy; ex (B, 3, 1, 1): sigma2, delta, gamma), fp32
    at least; the affine map's output split once (one op where two slices are two). The trailing
    unit dims let every part broadcast against a bank's (B, G, N, length) or a glimpse's
    (B, C, N, N) without a view op."""
    p = at_least_fp32(p).view(-1, 5, 1, 1)
    scale, shift = _affine(height, width, n, p.device, p.dtype)
    centres, logs = torch.addcmul(shift, p, scale).split([2, 3], 1)
    return centres, logs.exp()


def _record(centres: Tensor, ex: Tensor) -> Tensor:
    """The packed window record (B, 5), columns WINDOW_KEYS, from _window_parts' (centres, ex)."""
    return torch.cat([centres, ex], 1).view(-1, 5)


def _coef(sigma2: Tensor) -> Tensor:
    """The filterbank's logit coefficient -1 / (2 max(sigma2, floor)), (B,)."""
    return (sigma2.clamp_min(SIGMA2_FLOOR) * -2.0).reciprocal()


def window_params(p: Tensor, height: int, width: int, n: int) -> dict[str, Tensor]:
    """Map the 5 raw outputs (B, 5) of a linear layer to DRAW's window parameters, each (B,).

    p = (gx~, gy~, log sigma2, log delta~, log gamma):
      gx = (A + 1)/2 (gx~ + 1), gy = (B + 1)/2 (gy~ + 1),
      delta = (max(A, B) - 1)/(N - 1) exp(log delta~), sigma2 = exp(log sigma2), gamma = exp(log gamma).
    With N = 1 the stride is meaningless; N - 1 is then taken as 1. fp32 at least.
    """
    return window_dict(_record(*_window_parts(p, height, width, n)))


def filterbank(
    cx: Tensor, cy: Tensor, delta: Tensor, sigma2: Tensor, n: int, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """Fx (B, N, W) and Fy (B, N, H): row i is a Gaussian over pixel positions a = 1..A centred at
    mu_i = g + (i - N/2 - 0.5) delta (i = 1..N), normalised to sum to 1.

    The normalisation is done in log space (a softmax of -(a - mu)^2 / (2 sigma2) over a): a row
    whose Gaussian lies far off the image, or a sigma2 so small that every exp() underflows,
    still sums to one (it concentrates on the nearest pixels) with finite values and gradients,
    where exp() then a division would give 0/0. sigma2 is floored at SIGMA2_FLOOR. The inputs are
    widened to fp32 at least first: Fx and Fy are fp32 (fp64 for fp64 inputs). A square image
    computes both in one bank.
    """
    cx, cy, delta, sigma2 = (at_least_fp32(t).view(-1, 1, 1, 1) for t in (cx, cy, delta, sigma2))
    coef = _coef(sigma2)
    if height == width:
        return _bank_fd(torch.cat([cx, cy], 1), delta, coef, n, width)[0].unbind(1)
    fx = _bank_fd(cx, delta, coef, n, width)[0][:, 0]
    return fx, _bank_fd(cy, delta, coef, n, height)[0][:, 0]


def read_glimpse(img: Tensor, fx: Tensor, fy: Tensor, gamma: Tensor) -> Tensor:
    """gamma Fy img Fx^T per channel: img (B, C, H, W) -> (B, C, N, N)."""
    b, c, h, w = img.shape
    t = torch.bmm(img.reshape(b, c * h, w), fx.transpose(1, 2))  # (B, C*H, N)
    return torch.matmul(fy.unsqueeze(1), t.view(b, c, h, -1)) * gamma.view(-1, 1, 1, 1)


def write_patch(w: Tensor, fx: Tensor, fy: Tensor, gamma: Tensor) -> Tensor:
    """(1 / gamma) Fy^T w Fx per channel: patch (B, C, N, N) -> (B, C, H, W)."""
    b, c, n, m = w.shape
    t = torch.bmm(w.reshape(b, c * n, m), fx)  # (B, C*N, W)
    return torch.matmul(fy.transpose(1, 2).unsqueeze(1), t.view(b, c, n, -1)) / gamma.view(-1, 1, 1, 1)


def window_area(cx: Tensor, cy: Tensor, delta: Tensor, n: int, height: int, width: int) -> Tensor:
    """The share of the image the write window covers, elementwise over cx, cy, delta (any shape).

    The window is the square g -+ n/2 * delta around its centre on each axis (as
    rcn_dist.sample.window_box draws it), in DRAW's units, where the image spans 0.5 .. width + 0.5
    (pixel column a, 0-based, has its centre at a + 1: the module docstring); its overlap with the
    image, divided by height * width. It ignores the filters' Gaussian width sigma: a window with
    delta ~ 0 and a wide sigma still smears over more pixels.
    """
    half = n / 2 * delta

    def overlap(c: Tensor, size: int) -> Tensor:
        return ((c + half).clamp(max=size + 0.5) - (c - half).clamp(min=0.5)).clamp(min=0)

    return overlap(cx, width) * overlap(cy, height) / (height * width)


# ------------------------------------------------------------------ one Function per drawing step
WINDOW_KEYS = ("cx", "cy", "sigma2", "delta", "gamma")
"""The columns of a packed window record (..., 5), as Reader and Writer return it."""


def window_dict(packed: Tensor) -> dict[str, Tensor]:
    """A packed window record (..., 5) -> {cx, cy, sigma2, delta, gamma}, each (...)."""
    return dict(zip(WINDOW_KEYS, packed.unbind(-1)))


@functools.lru_cache(maxsize=64)
def _backward_matrix(height: int, width: int, n: int, device: torch.device, dtype: torch.dtype,
                     gamma_sign: float = 1.0) -> Tensor:
    """K (2N + 2, 5): the constant linear map from one backward row r = (the N x-filter sums,
    the N y-filter sums, the sigma2 sum, the gamma sum) to dp (B, 5) before delta's factor (see
    _window_backward); d log gamma = gamma_sign * the gamma sum (the write divides by gamma: -1,
    a sign here instead of a negation a step). Made once per geometry, device, dtype and sign."""
    offs = _positions(n, 1, device, dtype)[0][:, 0]  # (N,)
    k = torch.zeros(2 * n + 2, 5, device=device, dtype=dtype)
    # d gx = -2 s_x sum_x, d gy = -2 s_y sum_y with _affine's scales s = (W + 1)/2, (H + 1)/2.
    k[:n, 0], k[n:2 * n, 1] = -(width + 1), -(height + 1)
    k[2 * n, 2], k[2 * n + 1, 4] = -1.0, gamma_sign  # d log sigma2 = -sum u diff; d log gamma
    k[:n, 3] = k[n:2 * n, 3] = -2.0 * offs  # d log delta = -2 delta sum_i offs_i sum_i (both axes)
    return k


def _forward_banks(p: Tensor, n: int, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple]:
    """p (B, 5) raw -> fx (B, N, W), fy (B, N, H), gamma (B, 1, 1, 1), the packed window record
    (B, 5) and what the backward needs: (record, banks), banks a tuple of (F, diff, diff * coef)
    per bank (one for a square image, its G = 2 axes stacked; else one per axis)."""
    centres, ex = _window_parts(p, height, width, n)  # (B, 2, 1, 1), (B, 3, 1, 1)
    sigma2, delta, gamma = ex.split(1, 1)  # (B, 1, 1, 1) each
    coef = _coef(sigma2)
    if height == width:
        banks = (_bank_fd(centres, delta, coef, n, width),)
        fx, fy = banks[0][0].unbind(1)
    else:
        cx, cy = centres.split(1, 1)
        banks = (_bank_fd(cx, delta, coef, n, width), _bank_fd(cy, delta, coef, n, height))
        fx, fy = banks[0][0][:, 0], banks[1][0][:, 0]
    record = _record(centres, ex)
    return fx, fy, gamma, record, (record, banks)


def _bank_fd(centres: Tensor, delta: Tensor, coef: Tensor, n: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """centres (B, G, 1, 1), delta and coef (B, 1, 1, 1) -> (F, diff, dc), each (B, G, N, length),
    with F = softmax(diff^2 coef) and dc = diff coef (the logits are dc * diff: one multiply, and
    dc is what the backward wants)."""
    offs, grid = _positions(n, length, centres.device, centres.dtype)  # (N, 1), (length,)
    diff = grid - torch.addcmul(centres, offs, delta)  # a - mu, mu = centre + offs delta
    dc = diff * coef
    return torch.softmax(dc * diff, dim=3), diff, dc


def _window_backward(dfx: Tensor, dfy: Tensor, gamma_sum: Tensor, saved: tuple, n: int, height: int,
                     width: int, gamma_sign: float = 1.0) -> Tensor:
    """d loss / d p (B, 5) from the gradients of fx, fy and of log gamma (gamma_sign * gamma_sum).

    With logit = diff^2 coef, diff = a - mu, mu = centre + offs delta, coef = -1 / (2 max(sigma2,
    floor)) and p's affine map (window_params), write e = d logit and u = e diff coef. Then d mu_i
    = -2 sum_a u; d centre = sum_i d mu_i; d log delta = delta sum_i offs_i d mu_i; d log sigma2 =
    -sum u diff above the floor (d coef / d log sigma2 = -coef; 0 below: clamp_min's gradient).
    So dp = (r K) with delta's factor on column 3, r = (sum_a u per x filter, per y filter,
    the sigma2 sum, the gamma sum) (B, 2N + 2) and K the constant map of _backward_matrix (which
    holds gamma_sign).
    """
    record, banks = saved
    grads = (torch.stack([dfx, dfy], 1),) if len(banks) == 1 else (dfx.unsqueeze(1), dfy.unsqueeze(1))
    b = record.shape[0]
    rows, sums = [], []
    for d_f, (f, diff, dc) in zip(grads, banks):
        u = torch.ops.aten._softmax_backward_data(d_f, f, 3, f.dtype) * dc  # (B, G, N, L)
        rows.append(u.sum(3).view(b, -1))  # (B, G * N)
        sums.append((u * diff).sum((1, 2, 3)))  # (B,)
    q = sums[0] if len(sums) == 1 else sums[0] + sums[1]
    _, _, sigma2, delta, _ = record.unbind(1)  # (B,) each
    q = torch.where(sigma2 >= SIGMA2_FLOOR, q, 0.0)
    k = _backward_matrix(height, width, n, record.device, record.dtype, gamma_sign)
    dp = torch.cat([*rows, torch.stack([q, gamma_sum], 1)], 1) @ k
    dp[:, 3].mul_(delta)
    return dp


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample dot products of two (B, ...) tensors: (B,)."""
    return (a * b).sum(tuple(range(1, a.dim())))


class _ReadFn(torch.autograd.Function):
    """(p (B, 5), x, canvas_prev (B, C, H, W)) -> the glimpses of x and of x_hat =
    x - sigmoid(canvas_prev), (B, 2*C*N*N), fp32 at least, and the packed window record (B, 5;
    not differentiable). x carries no gradient (the image)."""

    @staticmethod
    def forward(ctx, p, x, canvas, n, height, width):
        fx, fy, gamma, record, saved = _forward_banks(p, n, height, width)
        s = torch.sigmoid(canvas)
        img = cast_to(torch.cat([x, x - s], 1), fx.dtype)  # (B, K = 2C, H, W)
        b = img.shape[0]
        # img Fx^T: einsum is one op where view, transpose and bmm are three, and the same bmm on
        # the same (B, K*H, W) view of img (its contraction dims are contiguous: no copy).
        t = torch.einsum("bkhw,bnw->bkhn", img, fx)  # (B, K, H, N)
        raw = torch.matmul(fy.unsqueeze(1), t)  # (B, K, N, N), before gamma
        ctx.save_for_backward(fx, fy, img, t, raw, s, gamma)
        ctx.saved, ctx.geometry, ctx.canvas_dtype = saved, (n, height, width), canvas.dtype
        ctx.mark_non_differentiable(record)
        ctx.set_materialize_grads(False)  # no zeros made for the record's gradient
        return (raw * gamma).view(b, -1), record

    @staticmethod
    def backward(ctx, d_out, _d_record):
        if d_out is None:  # the glimpse got no gradient (grads are not materialised: see forward)
            return None, None, None, None, None, None
        fx, fy, img, t, raw, s, gamma = ctx.saved_tensors
        n, h, w = ctx.geometry
        b, k = img.shape[:2]
        d_raw = cast_to(d_out, fx.dtype).view(b, k, n, n) * gamma
        dfy = torch.matmul(d_raw, t.transpose(2, 3)).sum(1)  # (B, N, H)
        dt = torch.matmul(fy.transpose(1, 2).unsqueeze(1), d_raw)  # (B, K, H, N)
        # The contractions over (k, h) and n as einsums: each one bmm on views, as in the forward.
        dfx = torch.einsum("bkhn,bkhw->bnw", dt, img)  # (B, N, W)
        d_canvas = None
        if ctx.needs_input_grad[2]:
            # x_hat is channels C.. of img: d x_hat = dt[x_hat's channels] Fx; x_hat = x - sigmoid(c).
            d_xhat = torch.einsum("bchn,bnw->bchw", dt[:, k // 2:], fx)  # (B, C, H, W)
            d_canvas = cast_to(torch.ops.aten.sigmoid_backward(d_xhat, s).neg_(), ctx.canvas_dtype)
        # d log gamma = gamma * sum d_out raw = sum d_raw raw.
        dp = _window_backward(dfx, dfy, _dot(d_raw, raw), ctx.saved, n, h, w)
        return dp, None, d_canvas, None, None, None


class _WriteFn(torch.autograd.Function):
    """(p (B, 5), patch (B, C*N*N), canvas_prev (B, C, H, W)) -> canvas_prev + (1 / gamma) Fy^T
    patch Fx, fp32 at least, and the packed window record (B, 5; not differentiable)."""

    @staticmethod
    def forward(ctx, p, patch, canvas, n, height, width):
        fx, fy, gamma, record, saved = _forward_banks(p, n, height, width)
        b, c = canvas.shape[:2]
        wp = cast_to(patch, fx.dtype).view(b, c, n, n)
        t = torch.einsum("bcmn,bnw->bcmw", wp, fx)  # (B, C, N, W): one bmm on the (B, C*N, N) view
        raw = torch.matmul(fy.transpose(1, 2).unsqueeze(1), t)  # (B, C, H, W)
        ctx.save_for_backward(fx, fy, wp, t, raw, gamma)
        ctx.saved, ctx.geometry, ctx.dtypes = saved, (n, height, width), (patch.dtype, canvas.dtype)
        ctx.mark_non_differentiable(record)
        ctx.set_materialize_grads(False)
        return torch.addcdiv(cast_to(canvas, raw.dtype), raw, gamma), record

    @staticmethod
    def backward(ctx, d_out, _d_record):
        if d_out is None:  # the canvas got no gradient (grads are not materialised: see forward)
            return None, None, None, None, None, None
        fx, fy, wp, t, raw, gamma = ctx.saved_tensors
        n, h, w = ctx.geometry
        b = raw.shape[0]
        d_raw = d_out / gamma
        dfy = torch.matmul(t, d_raw.transpose(2, 3)).sum(1)  # (B, N, H)
        dt = torch.matmul(fy.unsqueeze(1), d_raw)  # (B, C, N, W)
        dfx = torch.einsum("bcmn,bcmw->bnw", wp, dt)  # (B, N, W)
        d_patch = cast_to(torch.einsum("bcmw,bnw->bcmn", dt, fx).view(b, -1), ctx.dtypes[0])
        # d log gamma = gamma * sum d_out * (-raw / gamma^2) = -sum d_raw raw: the sign in K.
        dp = _window_backward(dfx, dfy, _dot(d_raw, raw), ctx.saved, n, h, w, gamma_sign=-1.0)
        return dp, d_patch, cast_to(d_out, ctx.dtypes[1]), None, None, None


class Reader(nn.Module):
    """DRAW's read: glimpses of x and of the error image x_hat = x - sigmoid(c_{t-1}), the window
    placed by h_dec(t-1).

    forward(x, canvas_prev (B, C, H, W), h_dec (B, hidden)) -> (glimpse (B, 2*C*N*N), fp32 at
    least; the window record (B, 5), columns WINDOW_KEYS, which carries no gradient: windows are
    recorded, not trained through).
    """

    def __init__(self, hidden: int, channels: int, height: int, width: int, n: int) -> None:
        super().__init__()
        self.h, self.w, self.n = height, width, n
        self.window = Linear(hidden, 5)

    def forward(self, x: Tensor, canvas_prev: Tensor, h_dec: Tensor) -> tuple[Tensor, Tensor]:
        p = self.window(cast_to(h_dec, self.window.weight.dtype))
        with no_autocast(p.device):  # the Function runs in fp32 at least, its backward too
            return _ReadFn.apply(p, x, canvas_prev, self.n, self.h, self.w)


class Writer(nn.Module):
    """DRAW's write: an N x N patch per channel from h_dec, placed on the canvas by a window from h_dec.

    forward(h_dec (B, hidden), canvas_prev (B, C, H, W)) -> (canvas_prev + the write, fp32 at
    least; the window record (B, 5), columns WINDOW_KEYS, which carries no gradient).
    """

    def __init__(self, hidden: int, channels: int, height: int, width: int, n: int) -> None:
        super().__init__()
        self.c, self.h, self.w, self.n = channels, height, width, n
        self.patch = Linear(hidden, channels * n * n)
        self.window = Linear(hidden, 5)

    def forward(self, h_dec: Tensor, canvas_prev: Tensor) -> tuple[Tensor, Tensor]:
        h_dec = cast_to(h_dec, self.window.weight.dtype)
        p, patch = self.window(h_dec), self.patch(h_dec)  # under the caller's autocast, if any
        with no_autocast(p.device):  # the Function runs in fp32 at least, its backward too
            return _WriteFn.apply(p, patch, canvas_prev, self.n, self.h, self.w)
