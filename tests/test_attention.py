"""DRAW's filterbank attention against the paper's equations."""

import math

import numpy as np
import pytest
import torch

from rcn_dist.model.attention import (
    WINDOW_KEYS,
    Reader,
    Writer,
    filterbank,
    read_glimpse,
    window_dict,
    window_params,
    write_patch,
)


def _win(cx, cy, delta, sigma2, dtype=torch.float64):
    return [torch.tensor([v], dtype=dtype) for v in (cx, cy, delta, sigma2)]


def test_filterbank_rows_sum_to_one_non_square():
    torch.manual_seed(0)
    H, W, n = 7, 11, 3
    cx, cy = 1 + (W - 1) * torch.rand(6), 1 + (H - 1) * torch.rand(6)
    delta, sigma2 = 0.2 + 1.5 * torch.rand(6), 0.3 + 3 * torch.rand(6)
    fx, fy = filterbank(cx, cy, delta, sigma2, n, H, W)
    assert fx.shape == (6, n, W) and fy.shape == (6, n, H)
    torch.testing.assert_close(fx.sum(2), torch.ones(6, n))
    torch.testing.assert_close(fy.sum(2), torch.ones(6, n))
    assert (fx >= 0).all() and (fy >= 0).all()


def test_tiny_variance_window_reads_the_pixel_it_is_centred_on():
    img = torch.arange(7 * 9, dtype=torch.float64).view(1, 1, 7, 9)
    row, col = 4, 2  # 0-based array indices: DRAW coordinates (x, y) = (col + 1, row + 1)
    fx, fy = filterbank(*_win(col + 1, row + 1, 1.0, 1e-4), n=1, height=7, width=9)
    g = read_glimpse(img, fx, fy, torch.ones(1, dtype=torch.float64))
    assert g.item() == img[0, 0, row, col].item()
    # A 3x3 window with stride 1 reads the 3x3 patch around it.
    fx, fy = filterbank(*_win(col + 1, row + 1, 1.0, 1e-4), n=3, height=7, width=9)
    g = read_glimpse(img, fx, fy, torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(g[0, 0], img[0, 0, row - 1:row + 2, col - 1:col + 2])


def test_read_after_write_with_matching_window_reproduces_the_patch():
    torch.manual_seed(0)
    patch = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    fx, fy = filterbank(*_win(6.0, 5.0, 2.0, 1e-3), n=4, height=10, width=12)
    gamma = torch.tensor([2.5], dtype=torch.float64)
    canvas = write_patch(patch, fx, fy, gamma)
    # Centres x = 3,5,7,9 and y = 2,4,6,8: columns 2,4,6,8 and rows 1,3,5,7 (0-based), scaled by 1/gamma.
    expected = torch.zeros_like(canvas)
    expected[:, :, 1:8:2, 2:9:2] = patch / 2.5
    torch.testing.assert_close(canvas, expected)
    torch.testing.assert_close(read_glimpse(canvas, fx, fy, gamma), patch)


def _reference(p, img, w_patch, n):
    """Read and write straight from the DRAW paper's equations (3)-(9), float64 loops."""
    _, _, B, A = img.shape
    gx_, gy_, log_s2, log_d, log_g = p
    gx, gy = (A + 1) / 2 * (gx_ + 1), (B + 1) / 2 * (gy_ + 1)
    delta = (max(A, B) - 1) / (n - 1) * math.exp(log_d)
    sigma2, gamma = math.exp(log_s2), math.exp(log_g)
    Fx, Fy = np.zeros((n, A)), np.zeros((n, B))
    for i in range(1, n + 1):
        mx = gx + (i - n / 2 - 0.5) * delta
        my = gy + (i - n / 2 - 0.5) * delta
        for a in range(1, A + 1):
            Fx[i - 1, a - 1] = math.exp(-((a - mx) ** 2) / (2 * sigma2))
        for b in range(1, B + 1):
            Fy[i - 1, b - 1] = math.exp(-((b - my) ** 2) / (2 * sigma2))
    Fx /= Fx.sum(1, keepdims=True)
    Fy /= Fy.sum(1, keepdims=True)
    read = np.stack([gamma * Fy @ img[0, c] @ Fx.T for c in range(img.shape[1])])
    write = np.stack([Fy.T @ w_patch[0, c] @ Fx / gamma for c in range(img.shape[1])])
    return (gx, gy, delta, sigma2, gamma), Fx, Fy, read, write


def test_matches_float64_reference_from_the_paper():
    rng = np.random.default_rng(0)
    n, C, H, W = 3, 2, 7, 10
    p = rng.normal(scale=0.5, size=5)
    img = rng.random((1, C, H, W))
    w_patch = rng.normal(size=(1, C, n, n))
    params, Fx, Fy, read, write = _reference(p, img, w_patch, n)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        win = window_params(torch.tensor(p[None], dtype=dtype), H, W, n)
        got = [win[k].item() for k in ("cx", "cy", "delta", "sigma2", "gamma")]
        np.testing.assert_allclose(got, params, rtol=tol)
        fx, fy = filterbank(win["cx"], win["cy"], win["delta"], win["sigma2"], n, H, W)
        np.testing.assert_allclose(fx[0].numpy(), Fx, rtol=tol, atol=tol)
        np.testing.assert_allclose(fy[0].numpy(), Fy, rtol=tol, atol=tol)
        r = read_glimpse(torch.tensor(img, dtype=dtype), fx, fy, win["gamma"])
        np.testing.assert_allclose(r[0].numpy(), read, rtol=tol, atol=tol)
        w = write_patch(torch.tensor(w_patch, dtype=dtype), fx, fy, win["gamma"])
        np.testing.assert_allclose(w[0].numpy(), write, rtol=tol, atol=tol)


def test_reader_and_writer_modules_use_their_window_layer():
    """The modules' one-Function forms against the functions: the glimpses of x and of
    x_hat = x - sigmoid(canvas), and canvas + the write (a non-square image: two banks)."""
    torch.manual_seed(0)
    C, H, W, n, hid = 3, 8, 6, 2, 5
    h = torch.randn(2, hid)
    x, canvas = torch.rand(2, C, H, W), torch.randn(2, C, H, W)
    reader = Reader(hid, C, H, W, n)
    g, packed = reader(x, canvas, h)
    win = window_dict(packed)
    assert g.shape == (2, 2 * C * n * n) and packed.shape == (2, 5) and tuple(win) == WINDOW_KEYS
    torch.testing.assert_close(win["cx"], window_params(reader.window(h), H, W, n)["cx"])
    fx, fy = filterbank(win["cx"], win["cy"], win["delta"], win["sigma2"], n, H, W)
    torch.testing.assert_close(g[:, : C * n * n], read_glimpse(x, fx, fy, win["gamma"]).flatten(1))
    x_hat = x - torch.sigmoid(canvas)
    torch.testing.assert_close(g[:, C * n * n:], read_glimpse(x_hat, fx, fy, win["gamma"]).flatten(1))
    writer = Writer(hid, C, H, W, n)
    out, packed = writer(h, canvas)
    win = window_dict(packed)
    assert out.shape == (2, C, H, W) and win["cx"].shape == (2,)
    fx, fy = filterbank(win["cx"], win["cy"], win["delta"], win["sigma2"], n, H, W)
    patch = writer.patch(h).view(2, C, n, n)
    torch.testing.assert_close(out, canvas + write_patch(patch, fx, fy, win["gamma"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cx,cy,sigma2", [
    (-40.0, 5.0, 1.0),      # wholly left of the image
    (5.0, 80.0, 0.5),       # wholly below it
    (-1e4, -1e4, 1e-3),     # far off, narrow
    (0.2, 9.7, 1.0),        # partly off: the window hangs over the corner
    (3.5, 4.0, 1e-12),      # between two pixels, a tiny variance
    (3.0, 4.0, 1e-40),      # a variance that underflows to zero in fp32
])
def test_filterbank_stays_finite_and_normalised_off_the_image_and_at_tiny_sigma(cx, cy, sigma2, dtype):
    H, W, n = 9, 7, 3
    params = [torch.tensor([v], dtype=dtype, requires_grad=True) for v in (cx, cy, 1.0, sigma2)]
    fx, fy = filterbank(*params, n=n, height=H, width=W)
    assert torch.isfinite(fx).all() and torch.isfinite(fy).all()
    ones = torch.ones(1, n, dtype=dtype)
    torch.testing.assert_close(fx.sum(2), ones)
    torch.testing.assert_close(fy.sum(2), ones)
    img = torch.rand(1, 1, H, W, dtype=dtype, generator=torch.Generator().manual_seed(0))
    g = read_glimpse(img, fx, fy, torch.ones(1, dtype=dtype))
    assert torch.isfinite(g).all()
    g.sum().backward()
    for p in params:
        assert torch.isfinite(p.grad).all(), p.grad
