"""DRAW's Gaussian-filterbank attention (Gregor et al. 2015, section 3.2).

Coordinates follow the DRAW paper: an image A pixels wide and B high has its pixel centres at
x = 1..A and y = 1..B, so the array column `a` (0-based) sits at x = a + 1. The window centre
(gx, gy), the stride delta and the variance sigma2 are in those pixel units; gamma is the intensity.

Precision: the window parameters, the filterbanks, the glimpses and the write run in fp32 at least
whatever the dtype of the window and patch layers (a bf16- or fp16-held model). In fp16 the
exponent -(a - mu)^2 / (2 sigma2) of a window off the image overflows to -inf, and a row of -inf
is NaN after the softmax; in bf16 a filter row has 3 significant digits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rcn_dist.model.precision import at_least_fp32, cast_to


def window_params(p: Tensor, height: int, width: int, n: int) -> dict[str, Tensor]:
    """Map the 5 raw outputs (B, 5) of a linear layer to DRAW's window parameters, each (B,).

    p = (gx~, gy~, log sigma2, log delta~, log gamma):
      gx = (A + 1)/2 (gx~ + 1), gy = (B + 1)/2 (gy~ + 1),
      delta = (max(A, B) - 1)/(N - 1) exp(log delta~), sigma2 = exp(log sigma2), gamma = exp(log gamma).
    With N = 1 the stride is meaningless; N - 1 is then taken as 1. fp32 at least.
    """
    gx_, gy_, log_sigma2, log_delta_, log_gamma = at_least_fp32(p).unbind(dim=1)
    return {
        "cx": (width + 1) / 2 * (gx_ + 1),
        "cy": (height + 1) / 2 * (gy_ + 1),
        "delta": (max(height, width) - 1) / max(n - 1, 1) * torch.exp(log_delta_),
        "sigma2": torch.exp(log_sigma2),
        "gamma": torch.exp(log_gamma),
    }


def filterbank(
    cx: Tensor, cy: Tensor, delta: Tensor, sigma2: Tensor, n: int, height: int, width: int, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Fx (B, N, W) and Fy (B, N, H): row i is a Gaussian over pixel positions a = 1..A centred at
    mu_i = g + (i - N/2 - 0.5) delta (i = 1..N), normalised to sum to 1.

    The normalisation is done in log space (a softmax of -(a - mu)^2 / (2 sigma2) over a): a row
    whose Gaussian lies far off the image, or a sigma2 so small that every exp() underflows,
    still sums to one (it concentrates on the nearest pixels) with finite values and gradients,
    where exp() then a division would give 0/0. sigma2 is floored at `eps` (1e-6 pixel^2, already a
    one-pixel window), so that the logits and their gradients stay finite in fp32 and bf16. The
    inputs are widened to fp32 at least first: Fx and Fy are fp32 (fp64 for fp64 inputs).
    """
    cx, cy, delta, sigma2 = (at_least_fp32(t) for t in (cx, cy, delta, sigma2))
    i = torch.arange(1, n + 1, dtype=cx.dtype, device=cx.device)
    offs = (i - n / 2 - 0.5)[None, :] * delta[:, None]  # (B, N)
    mu_x, mu_y = cx[:, None] + offs, cy[:, None] + offs
    ax = torch.arange(1, width + 1, dtype=cx.dtype, device=cx.device)
    ay = torch.arange(1, height + 1, dtype=cx.dtype, device=cx.device)
    s2 = 2 * sigma2.clamp_min(eps)[:, None, None]
    fx = torch.softmax(-((ax[None, None, :] - mu_x[:, :, None]) ** 2) / s2, dim=2)
    fy = torch.softmax(-((ay[None, None, :] - mu_y[:, :, None]) ** 2) / s2, dim=2)
    return fx, fy


def read_glimpse(img: Tensor, fx: Tensor, fy: Tensor, gamma: Tensor) -> Tensor:
    """gamma Fy img Fx^T per channel: img (B, C, H, W) -> (B, C, N, N)."""
    return gamma[:, None, None, None] * torch.einsum("bnh,bchw,bmw->bcnm", fy, img, fx)


def write_patch(w: Tensor, fx: Tensor, fy: Tensor, gamma: Tensor) -> Tensor:
    """(1 / gamma) Fy^T w Fx per channel: patch (B, C, N, N) -> (B, C, H, W)."""
    return torch.einsum("bnh,bcnm,bmw->bchw", fy, w, fx) / gamma[:, None, None, None]


class Reader(nn.Module):
    """DRAW's read: glimpses of x and of the error image x_hat, window placed by h_dec(t-1).

    forward(x, x_hat (B, C, H, W), h_dec (B, hidden)) -> (glimpse (B, 2*C*N*N), windows dict).
    """

    def __init__(self, hidden: int, channels: int, height: int, width: int, n: int) -> None:
        super().__init__()
        self.h, self.w, self.n = height, width, n
        self.window = nn.Linear(hidden, 5)

    def forward(self, x: Tensor, x_hat: Tensor, h_dec: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """x and x_hat as they come (fp32 for a bf16-held model): the glimpse is read in the
        filterbank's fp32 and handed on so; RNN_enc casts it to its weights where it enters."""
        win = window_params(self.window(cast_to(h_dec, self.window.weight.dtype)), self.h, self.w, self.n)
        fx, fy = filterbank(win["cx"], win["cy"], win["delta"], win["sigma2"], self.n, self.h, self.w)
        x, x_hat = cast_to(x, fx.dtype), cast_to(x_hat, fx.dtype)
        g = torch.cat([read_glimpse(x, fx, fy, win["gamma"]), read_glimpse(x_hat, fx, fy, win["gamma"])], 1)
        return g.flatten(1), win


class Writer(nn.Module):
    """DRAW's write: an N x N patch per channel from h_dec, placed on the canvas by a window from h_dec.

    forward(h_dec (B, hidden)) -> (canvas increment (B, C, H, W), windows dict).
    """

    def __init__(self, hidden: int, channels: int, height: int, width: int, n: int) -> None:
        super().__init__()
        self.c, self.h, self.w, self.n = channels, height, width, n
        self.patch = nn.Linear(hidden, channels * n * n)
        self.window = nn.Linear(hidden, 5)

    def forward(self, h_dec: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The increment comes back in fp32 at least, for the fp32 canvas it is added to."""
        h_dec = cast_to(h_dec, self.window.weight.dtype)
        win = window_params(self.window(h_dec), self.h, self.w, self.n)
        fx, fy = filterbank(win["cx"], win["cy"], win["delta"], win["sigma2"], self.n, self.h, self.w)
        w = cast_to(self.patch(h_dec), fx.dtype).view(-1, self.c, self.n, self.n)
        return write_patch(w, fx, fy, win["gamma"]), win
