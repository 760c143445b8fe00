"""The op cuts of a drawing step hold the arithmetic: the attention (one autograd Function per
read and per write, its backward written out) and the capsules' routing against frozen copies of
the first release's functions, values and gradients; and the counts they cut, from the profiler.

The frozen copies below are the code as it was, verbatim but for names; do not edit them.
"""

from __future__ import annotations

import pytest
import torch

from rcn_dist.bench.base import count_ops
from rcn_dist.config import preset
from rcn_dist.model import RCN, sample_noise
from rcn_dist.model import capsules as caps_mod
from rcn_dist.model.attention import Reader, Writer


# ------------------------------------------------------------------ frozen: attention
def frozen_window_params(p, height, width, n):
    gx_, gy_, log_sigma2, log_delta_, log_gamma = p.unbind(dim=1)
    return {
        "cx": (width + 1) / 2 * (gx_ + 1),
        "cy": (height + 1) / 2 * (gy_ + 1),
        "delta": (max(height, width) - 1) / max(n - 1, 1) * torch.exp(log_delta_),
        "sigma2": torch.exp(log_sigma2),
        "gamma": torch.exp(log_gamma),
    }


def frozen_filterbank(cx, cy, delta, sigma2, n, height, width, eps=1e-6):
    i = torch.arange(1, n + 1, dtype=cx.dtype, device=cx.device)
    offs = (i - n / 2 - 0.5)[None, :] * delta[:, None]  # (B, N)
    mu_x, mu_y = cx[:, None] + offs, cy[:, None] + offs
    ax = torch.arange(1, width + 1, dtype=cx.dtype, device=cx.device)
    ay = torch.arange(1, height + 1, dtype=cx.dtype, device=cx.device)
    s2 = 2 * sigma2.clamp_min(eps)[:, None, None]
    fx = torch.softmax(-((ax[None, None, :] - mu_x[:, :, None]) ** 2) / s2, dim=2)
    fy = torch.softmax(-((ay[None, None, :] - mu_y[:, :, None]) ** 2) / s2, dim=2)
    return fx, fy


def frozen_read_glimpse(img, fx, fy, gamma):
    return gamma[:, None, None, None] * torch.einsum("bnh,bchw,bmw->bcnm", fy, img, fx)


def frozen_write_patch(w, fx, fy, gamma):
    return torch.einsum("bnh,bcnm,bmw->bchw", fy, w, fx) / gamma[:, None, None, None]


def _record(win):
    return torch.stack([win[k] for k in ("cx", "cy", "sigma2", "delta", "gamma")], 1)


def frozen_reader_forward(self, x, canvas, h_dec):
    """The first release's Reader.forward(x, x_hat, h_dec), x_hat = x - sigmoid(canvas) as
    Encoder.step made it, the windows packed as the new Reader returns them."""
    x_hat = x - torch.sigmoid(canvas)
    win = frozen_window_params(self.window(h_dec), self.h, self.w, self.n)
    fx, fy = frozen_filterbank(win["cx"], win["cy"], win["delta"], win["sigma2"], self.n, self.h, self.w)
    g = torch.cat([frozen_read_glimpse(x, fx, fy, win["gamma"]), frozen_read_glimpse(x_hat, fx, fy, win["gamma"])], 1)
    return g.flatten(1), _record(win)


def frozen_writer_forward(self, h_dec, canvas):
    """The first release's Writer.forward(h_dec) and Decoder.step's canvas + delta."""
    win = frozen_window_params(self.window(h_dec), self.h, self.w, self.n)
    fx, fy = frozen_filterbank(win["cx"], win["cy"], win["delta"], win["sigma2"], self.n, self.h, self.w)
    w = self.patch(h_dec).view(-1, self.c, self.n, self.n)
    return canvas + frozen_write_patch(w, fx, fy, win["gamma"]), _record(win)


# ------------------------------------------------------------------ frozen: capsules
def frozen_squash(s, dim=-1, eps=1e-8):
    n2 = (s * s).sum(dim=dim, keepdim=True)
    return s * (n2 / ((1.0 + n2) * torch.sqrt(n2 + eps)))


def frozen_dynamic_routing(u_hat, iters):
    b = u_hat.new_zeros(u_hat.shape[:3])  # (B, n_parent, n_child)
    u_detached = u_hat.detach()
    for r in range(iters):
        c = torch.softmax(b, dim=1)
        last = r == iters - 1
        s = (c.unsqueeze(2) @ (u_hat if last else u_detached)).squeeze(2)  # (B, n_parent, dim)
        v = frozen_squash(s)
        if not last:
            b = b + (u_detached @ v.unsqueeze(3)).squeeze(3)
    return v, c


def frozen_routed_forward(self, u):
    u_hat = torch.einsum("ijdk,bik->bjid", self.weight, u.to(self.weight.dtype))
    v = frozen_dynamic_routing(u_hat.float() if u_hat.dtype not in (torch.float32, torch.float64) else u_hat,
                               self.iters)[0]
    return v.to(self.weight.dtype)


def frozen_primary_forward(self, x):
    u = self.conv(x)
    b, _, h, w = u.shape
    u = u.view(b, self.types, self.dim, h, w).permute(0, 1, 3, 4, 2)
    return frozen_squash(u.reshape(b, self.types * h * w, self.dim).float()
                         if u.dtype not in (torch.float32, torch.float64) else u.reshape(b, self.types * h * w, self.dim))


def use_frozen(monkeypatch) -> None:
    monkeypatch.setattr(Reader, "forward", frozen_reader_forward)
    monkeypatch.setattr(Writer, "forward", frozen_writer_forward)
    monkeypatch.setattr(caps_mod.RoutedCapsules, "forward", frozen_routed_forward)
    monkeypatch.setattr(caps_mod.PrimaryCapsules, "forward", frozen_primary_forward)


# ------------------------------------------------------------------ the comparisons
def _loss_and_grads(model, x, y, eps):
    model.zero_grad(set_to_none=True)
    out = model(x, eps)
    terms = model.loss_terms(x, y, eps, out=out)
    terms["loss"].sum().backward()
    return out, terms, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 2e-4, 1e-5)])
def test_the_model_gives_the_first_releases_outputs_and_gradients(dtype, rtol, atol, monkeypatch):
    """tiny with a windowed read and write, T = 6: the canvases, windows, every loss term and the
    gradient of every parameter, against the same weights run through the frozen functions."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.model.T = 6
    model = RCN(cfg.model).to(dtype)
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 1, 28, 28, generator=g) > 0.6).to(dtype)
    y = torch.randint(0, 10, (4,), generator=g)
    eps = sample_noise(torch.arange(4), 5, cfg.model.T, cfg.model.z_dim, dtype=dtype)
    out, terms, grads = _loss_and_grads(model, x, y, eps)
    with monkeypatch.context() as m:
        use_frozen(m)
        ref_out, ref_terms, ref_grads = _loss_and_grads(model, x, y, eps)
    torch.testing.assert_close(out.canvas, ref_out.canvas, rtol=rtol, atol=atol)
    for kind in ("read_windows", "write_windows"):
        for k, v in getattr(ref_out, kind).items():
            torch.testing.assert_close(getattr(out, kind)[k], v, rtol=rtol, atol=atol)
    for k in ("loss", "recon", "kl", "margin"):
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for k, v in ref_grads.items():
        scale = v.abs().max().clamp_min(1.0)
        torch.testing.assert_close(grads[k] / scale, v / scale, rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("C,H,W,n", [(1, 7, 7, 3), (3, 8, 6, 2), (2, 5, 9, 1)])
def test_reader_and_writer_match_the_frozen_ones_on_any_geometry(C, H, W, n, monkeypatch):
    """Non-square images take two filterbanks, N = 1 the degenerate stride; windows off the image
    and below the variance floor included (fp64)."""
    torch.manual_seed(1)
    reader, writer = Reader(6, C, H, W, n).double(), Writer(6, C, H, W, n).double()
    with torch.no_grad():  # windows far off, wide and narrow, some below sigma2's floor
        for lin, bias in ((reader.window, [2.0, -1.5, 0.5, 0.5, 0.3]), (writer.window, [-1.0, 3.0, -16.0, 0.5, -0.3])):
            lin.weight.mul_(8)
            lin.bias.copy_(torch.tensor(bias))
    h = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    x = torch.rand(5, C, H, W, dtype=torch.float64)
    canvas = torch.randn(5, C, H, W, dtype=torch.float64, requires_grad=True)

    def run():
        g, rwin = reader(x, canvas, h)
        c, wwin = writer(h, canvas)
        loss = (g * torch.linspace(-1, 1, g.shape[1], dtype=g.dtype)).sum() + (c.sin()).sum()
        grads = torch.autograd.grad(loss, [h, canvas, *reader.parameters(), *writer.parameters()])
        return (g, c, rwin, wwin), grads

    new = run()
    with monkeypatch.context() as m:
        use_frozen(m)
        old = run()
    for a, b in zip([*new[0], *new[1]], [*old[0], *old[1]]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-6)])
def test_routed_capsules_match_the_frozen_routing(iters, dtype, rtol, atol, monkeypatch):
    """One Function for predictions, routing and squash (iteration 1 without its softmax of zeros):
    v and the gradients of u and W as the first release's einsum + dynamic_routing gave them."""
    torch.manual_seed(iters)
    layer = caps_mod.RoutedCapsules(12, 4, 5, 6, iters=iters).to(dtype)
    u = torch.randn(3, 12, 4, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 6, dtype=dtype)

    def run():
        v = layer(u)
        return (v, *torch.autograd.grad((v * g).sum(), [u, layer.weight]))

    new = run()
    with monkeypatch.context() as m:
        use_frozen(m)
        old = run()
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_the_squash_function_matches_the_frozen_squash_down_to_zero():
    """_SquashFn's written backward against autograd's, for vectors from 0 (the eps floor) to
    large ones, fp64."""
    s = torch.randn(6, 7, 8, dtype=torch.float64) * torch.logspace(-6, 2, 6, dtype=torch.float64).view(6, 1, 1)
    s[0, 0] = 0.0
    s.requires_grad_(True)
    g = torch.randn_like(s)
    v = caps_mod._SquashFn.apply(s)
    (ds,) = torch.autograd.grad((v * g).sum(), [s])
    v_ref = frozen_squash(s)
    (ds_ref,) = torch.autograd.grad((v_ref * g).sum(), [s])
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ds, ds_ref, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(ds).all() and (ds[0, 0] == 0).all()  # squash is flat at 0: k(0) = 0


@pytest.mark.parametrize("name", ["small", "mnist"])
def test_a_drawing_step_dispatches_half_the_ops_of_the_first_release(name):
    """The counts docs/performance.md quotes, as a bound that catches a regression: a drawing
    step, forward and backward, was 614 aten ops (380 launching a kernel) in the first release,
    for both presets; at most half of that now (306 measured, 249 launching)."""
    c1, c2 = count_ops(preset(name), T=2), count_ops(preset(name), T=3)  # a middle step (rcn_dist.bench.base)
    per_step = {u: sum(c2[ph][u] - c1[ph][u] for ph in ("forward", "backward")) for u in ("aten", "launching")}
    assert per_step["aten"] <= 614 // 2 and per_step["launching"] <= 260, per_step


# ------------------------------------------------------------------ the latent head and the canvas record
def frozen_latent(head, h, eps):
    """The first release's head: mu, logvar from an nn.Linear in its weights' dtype, widened to
    fp32 at least; z = mu + exp(logvar / 2) eps."""
    out = torch.nn.functional.linear(h, head.weight, head.bias)
    mu, logvar = out.to(torch.promote_types(out.dtype, torch.float32)).chunk(2, dim=1)
    return torch.addcmul(mu, torch.exp(0.5 * logvar), eps), mu, logvar


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-14), (torch.float32, 1e-6, 1e-7)])
def test_the_gaussian_head_matches_the_frozen_head(dtype, rtol, atol):
    """GaussianHead (one Function: linear, chunk, exp, addcmul, backward written out) against
    autograd's graph of the same ops: z, mu, logvar and the gradients of h, W and b through all
    three outputs (a loss on z alone too: mu's and logvar's gradients then come as None)."""
    from rcn_dist.model.rcn import GaussianHead

    torch.manual_seed(0)
    head = GaussianHead(24, 2 * 6).to(dtype)
    h = torch.randn(5, 24, dtype=dtype, requires_grad=True)
    eps = torch.randn(5, 6, dtype=dtype)
    for uses_stats in (True, False):
        outs = [head(h, eps), frozen_latent(head, h, eps)]
        losses = [(o[0] ** 2).sum() + ((o[1] * o[2]).sum() if uses_stats else 0) for o in outs]
        grads = [torch.autograd.grad(loss, (h, head.weight, head.bias)) for loss in losses]
        for a, b in zip(outs[0], outs[1]):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_the_latent_head_runs_its_matmul_in_the_autocast_dtype():
    """Under CPU bf16 autocast the head's matmul runs in bf16 (as nn.Linear's would), and z, mu and
    logvar come back in fp32."""
    from rcn_dist.model.rcn import GaussianHead

    torch.manual_seed(0)
    head = GaussianHead(24, 12)
    h, eps = torch.randn(5, 24), torch.randn(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, mu, logvar = head(h, eps)
        ref = torch.nn.functional.linear(h, head.weight, head.bias)  # bf16 under autocast
    assert ref.dtype == torch.bfloat16 and {t.dtype for t in (z, mu, logvar)} == {torch.float32}
    torch.testing.assert_close(torch.cat([mu, logvar], 1), ref.float(), rtol=0, atol=0)


def test_the_canvas_record_carries_no_gradient_and_the_loss_reads_the_last_canvas():
    """RCNOutput.canvas is a record (no autograd history, so the T - 1 canvases no loss reads
    send no zero gradients back); last_canvas is c_T with its gradient, equal to canvas[:, -1]."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = RCN(cfg.model)
    x = (torch.rand(2, cfg.model.in_channels, cfg.model.height, cfg.model.width) > 0.5).float()
    eps = sample_noise(torch.arange(2), 7, cfg.model.T, cfg.model.z_dim)
    out = model(x, eps)
    assert out.canvas.grad_fn is None and out.last_canvas.grad_fn is not None
    assert torch.equal(out.canvas[:, -1], out.last_canvas)
