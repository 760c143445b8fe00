"""Precision under a model held in bf16 or fp16 as a whole, as DeepSpeed's bf16/fp16 engines hold
it (every weight cast, no autocast), with the image and the latent noise handed over in fp32.

What sums, compares or normalises across layers must stay in fp32: the canvas (T writes), eps and
z, the KL, both likelihoods, the filterbanks and the capsules' routing (docs/training.md,
Precision).
"""

import pytest
import torch

from rcn_dist.config import preset
from rcn_dist.model import RCN, sample_noise
from rcn_dist.model.attention import filterbank, window_params
from rcn_dist.model.losses import bernoulli_nll, discretized_logistic_nll


def _batch(cfg, n: int = 32):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(n, 1, 28, 28, generator=g) > 0.7).float()
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y, sample_noise(torch.arange(n), 3, cfg.model.T, cfg.model.z_dim)


def _held(model: RCN, dtype: torch.dtype) -> RCN:
    held = RCN(model.cfg)
    held.load_state_dict(model.state_dict())
    return held.to(dtype)


def test_bf16_held_model_keeps_fp32_where_it_sums_and_gives_the_fp32_elbo_at_T64():
    """A tiny-width model at T = 64 whose writes are scaled up 20x, so that the canvas reaches
    logits of about 100 as a trained model's does: the bf16-held copy's negative ELBO is within
    0.5% of fp32's (measured: 0.06% here; 0.19% with the old cast of x and eps to bf16, when
    the canvas, z and the likelihood were bf16), and the quantities that sum are fp32."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.model.T = 64
    model = RCN(cfg.model)
    with torch.no_grad():
        model.decoder.writer.patch.weight.mul_(20)
        model.decoder.writer.patch.bias.mul_(20)
    x, y, eps = _batch(cfg)
    held = _held(model, torch.bfloat16)
    with torch.no_grad():
        ref = model.loss_terms(x, y, eps)["elbo"].double().mean()
        out = held(x, eps)
        got = held.loss_terms(x, y, eps, out=out)
    assert out.canvas[:, -1].abs().max() > 50  # the regime where bf16 rounding of the canvas would bite
    for name in ("canvas", "mu", "logvar", "kl", "class_lengths"):
        assert getattr(out, name).dtype == torch.float32, name
    for name in ("recon", "kl", "elbo", "loss", "margin"):
        assert got[name].dtype == torch.float32, name
    assert abs(got["elbo"].double().mean() - ref) / ref < 5e-3, (got["elbo"].mean().item(), ref.item())


def test_eps_is_used_unrounded_by_a_bf16_held_encoder():
    """z = mu + sigma * eps with eps in fp32: z - mu equals sigma * eps in fp32, not bf16(eps)."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    held = _held(RCN(cfg.model), torch.bfloat16)
    x, _, eps = _batch(cfg, 8)
    enc = held.encoder
    state = enc.init_state(8, x)
    caps = enc.capsules(x).flatten(1)
    canvas = torch.zeros_like(x)
    h_dec = torch.zeros(8, cfg.model.dec_hidden, dtype=torch.bfloat16)
    with torch.no_grad():
        _, z, mu, logvar, _ = enc.step(x, caps, canvas, h_dec, state, eps[:, 0])
    assert z.dtype == torch.float32
    sigma = torch.exp(0.5 * logvar)
    # Equal up to fp32 rounding (one fused multiply-add against two ops), where bf16(eps) is off
    # by up to 2^-9 of eps.
    torch.testing.assert_close(z, mu + sigma * eps[:, 0], rtol=1e-6, atol=1e-6)
    assert (z - (mu + sigma * eps[:, 0].bfloat16().float())).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_filterbank_off_the_image_with_a_tiny_variance_has_finite_rows_summing_to_one(dtype):
    """In fp16 -(a - mu)^2 / (2 sigma2) overflows to -inf for a window off the image with sigma2
    at its 1e-6 floor, and a row of -inf is NaN after the softmax: the filterbank widens first."""
    cx = torch.tensor([-40.0, 14.0, 70.0], dtype=dtype)
    cy = torch.tensor([14.0, -40.0, 70.0], dtype=dtype)
    delta = torch.tensor([3.0, 1.0, 5.0], dtype=dtype)
    sigma2 = torch.tensor([1e-6, 1e-6, 1e-3], dtype=dtype)
    fx, fy = filterbank(cx, cy, delta, sigma2, n=5, height=28, width=28)
    for f in (fx, fy):
        assert f.dtype == torch.float32
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f.sum(-1), torch.ones(3, 5))
    # The window parameters of half raw outputs are widened too (exp of a large log-variance).
    win = window_params(torch.tensor([[0.0, 0.0, 12.0, 0.0, 12.0]], dtype=dtype), 28, 28, 5)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in win.values())


@pytest.mark.parametrize("log_scale", [-6.0, -4.0, -3.0])
def test_fp16_likelihoods_take_no_log_of_zero(log_scale):
    """fp16 logits, scales and image (as the old cast of x to the engine's dtype handed them): in
    fp16 the bin mass sigmoid(a) - sigmoid(b) and the clamp's 1e-12 round to 0, so log(0) sits in
    the branch `where` does not take, and its gradient is NaN. Values and gradients finite."""
    logits = torch.linspace(-20, 20, 81, dtype=torch.float16).view(1, 1, 9, 9).requires_grad_()
    x = torch.linspace(0, 1, 81, dtype=torch.float16).view(1, 1, 9, 9)
    scale = torch.tensor([log_scale], dtype=torch.float16, requires_grad=True)
    nll = discretized_logistic_nll(logits, scale, x)
    assert nll.dtype == torch.float32 and torch.isfinite(nll).all()
    nll.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(scale.grad).all()
    b = bernoulli_nll(logits.detach(), (x > 0.5).half())
    assert b.dtype == torch.float32 and torch.isfinite(b).all()


def test_fp16_held_model_trains_a_step_with_finite_gradients():
    """The whole path in fp16 at T = 64 (the engine's fp16 mode without its loss scaling): finite
    terms and gradients."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.model.T = 64
    held = _held(RCN(cfg.model), torch.float16)
    x, y, eps = _batch(cfg, 8)
    terms = held.loss_terms(x, y, eps)
    assert all(torch.isfinite(terms[k]).all() for k in ("loss", "elbo"))
    terms["loss"].mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in held.parameters() if p.grad is not None)


def test_under_autocast_the_attention_runs_in_fp32_forward_and_backward():
    """`rcn bench --precision bf16` runs the fp32 model under bf16 autocast: the attention
    Functions switch it off inside (their saved tensors and backward stay fp32)."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = RCN(cfg.model)
    x, y, eps = _batch(cfg, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, eps)
        loss = model.loss_terms(x, y, eps, out=out)["loss"].mean()
    assert out.canvas.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
