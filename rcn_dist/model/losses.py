"""Losses of the RCN, all per sample and in nats: margin loss, -log D(x | c_T), per-step KL.

The KL and both likelihoods are evaluated in fp32 at least: bf16/fp16 inputs are widened first
(fp32 and fp64 are kept), so a bf16- or fp16-held model gets fp32 terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcn_dist.model.precision import at_least_fp32, common_wide

TERMS = ("loss", "margin", "recon", "kl", "elbo")
"""The per-sample loss parts of RCN.loss_terms that training logs, in this order: the columns of
every layout's step result (the training loop's rows, the pipeline's last stage)."""


def margin_loss(
    lengths: Tensor, labels: Tensor, m_plus: float = 0.9, m_minus: float = 0.1, lam: float = 0.5
) -> Tensor:
    """Per-sample margin loss sum_k T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2.

    lengths: (B, K) capsule lengths. labels: (B,) integer classes, or (B, K) multi-hot floats
    (several objects present). Returns (B,).
    """
    t = (F.one_hot(labels.long(), lengths.shape[1]) if labels.dim() == 1 else labels).to(lengths.dtype)
    present = t * F.relu(m_plus - lengths) ** 2
    absent = lam * (1.0 - t) * F.relu(lengths - m_minus) ** 2
    return (present + absent).sum(dim=1)


def top_k_correct(scores: Tensor, labels: Tensor) -> Tensor:
    """(B,) bool: the highest score is the label (B,), or for multi-hot labels (B, K) the k highest
    scores are exactly the k labelled classes."""
    if labels.dim() == 1:
        return scores.argmax(dim=1) == labels
    target = labels > 0.5
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = highest
    return ((rank < target.sum(dim=1, keepdim=True)) == target).all(dim=1)


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) = 0.5 sum_d (mu^2 + sigma^2 - log sigma^2 - 1), summed over
    the last axis: (..., z_dim) -> (...). fp32 at least."""
    mu, logvar = at_least_fp32(mu), at_least_fp32(logvar)
    return 0.5 * (mu * mu + logvar.exp() - logvar - 1.0).sum(dim=-1)


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log Bernoulli(x | sigmoid(logits)) summed over pixels: (B, C, H, W) -> (B,).

    x is expected binary (the loader binarises); grey x gives the cross-entropy, not a likelihood.
    Evaluated in fp32 at least.
    """
    logits, x = common_wide(logits, x)
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(dim=1)


def discretized_logistic_nll(logits: Tensor, log_scale: Tensor, x: Tensor) -> Tensor:
    """-log P(x) under a logistic with mean sigmoid(logits) and scale exp(log_scale[channel]),
    discretised to 256 bins of width 1/255 on [0, 1] (the end bins take the tails), summed over
    sub-pixels: logits, x (B, C, H, W), log_scale (C,) -> (B,).

    x in [0, 1] is quantised to k/255 first. Follows PixelCNN++'s numerically safe form, in fp32 at
    least: in fp16 the clamp's 1e-12 flushes to 0, and a bin mass taken as the difference of two
    sigmoids near 1 is a multiple of 2^-11 (often 0), so log(cdf_delta) would be -inf and its
    gradient NaN even where the `where` keeps the other branch.
    """
    logits, log_scale, x = common_wide(logits, log_scale, x)
    x = torch.round(x.clamp(0, 1) * 255) / 255
    log_s = log_scale.view(1, -1, 1, 1)
    inv_s = torch.exp(-log_s)
    centred = x - torch.sigmoid(logits)
    half = 0.5 / 255
    plus_in, min_in, mid_in = inv_s * (centred + half), inv_s * (centred - half), inv_s * centred
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): bin k = 0
    log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)): bin k = 255
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    # Where the bin mass underflows, density at the centre x bin width.
    log_pdf_mid = mid_in - log_s - 2 * F.softplus(mid_in) - math.log(255)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    logp = torch.where(x < half, log_cdf_plus, torch.where(x > 1 - half, log_one_minus_cdf_min, log_mid))
    return -logp.flatten(1).sum(dim=1)


def bits_per_dim(nats: Tensor | float, n_dims: int) -> Tensor | float:
    """Nats per image -> bits per sub-pixel (n_dims = C * H * W)."""
    return nats / (n_dims * math.log(2))


class LossModule(nn.Module):
    """The RCN and its per-sample loss terms in one forward: what a layout that holds the whole
    model trains (the DeepSpeed engine wraps it) and what `rcn_dist.evaluation.evaluate` calls.

    Inputs pass as they come (fp32), whatever dtype DeepSpeed's bf16/fp16 engine cast the weights
    to: the model casts each layer's input to that layer's weights and keeps the canvas, the
    likelihoods, the KL and the latent noise eps in fp32 (docs/training.md, "Precision"). Rounding
    eps or x to bf16 here would change the sample and the likelihood, not just the arithmetic.
    The terms come back in fp32 at least, so that sums over a test set stay exact enough to
    compare across layouts.
    """

    def __init__(self, rcn: nn.Module):
        super().__init__()
        self.rcn = rcn

    def forward(self, x: Tensor, y: Tensor, eps: Tensor, x_caps: Tensor | None = None) -> dict[str, Tensor]:
        terms = self.rcn.loss_terms(x, y, eps=eps, x_caps=x_caps)
        return {k: at_least_fp32(v) if v.is_floating_point() else v for k, v in terms.items()}
