"""Losses: margin loss by hand, KL against Monte Carlo, the two likelihoods."""

import math

import torch

from rcn_dist.model import bits_per_dim, kl_standard_normal, margin_loss
from rcn_dist.model.losses import bernoulli_nll, discretized_logistic_nll


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.05, 0.5], [0.95, 0.05, 0.5]])
    # Class 0 present: 0 + 0.5 * (0.5 - 0.1)^2 = 0.08. Class 2: (0.9 - 0.5)^2 + 0.5 * 0.85^2 = 0.52125.
    got = margin_loss(lengths, torch.tensor([0, 2]))
    torch.testing.assert_close(got, torch.tensor([0.08, 0.52125]))
    # lambda = 1 doubles the absent-class terms only.
    got = margin_loss(lengths, torch.tensor([0, 2]), lam=1.0)
    torch.testing.assert_close(got, torch.tensor([0.16, 0.16 + 0.7225]))
    # Other margins: m+ = 0.6, m- = 0.2 -> class 2: 0.1^2 + 0.5 * 0.75^2.
    got = margin_loss(lengths[:1], torch.tensor([2]), m_plus=0.6, m_minus=0.2)
    torch.testing.assert_close(got, torch.tensor([0.01 + 0.5 * 0.5625]))


def test_margin_loss_multi_hot():
    lengths = torch.tensor([[0.95, 0.05, 0.5]])
    # Classes 0 and 2 present: (0.9 - 0.5)^2 = 0.16; class 1 absent and short: 0.
    torch.testing.assert_close(margin_loss(lengths, torch.tensor([[1.0, 0.0, 1.0]])), torch.tensor([0.16]))
    # One-hot floats equal integer labels.
    torch.testing.assert_close(margin_loss(lengths, torch.tensor([[0.0, 0.0, 1.0]])),
                               margin_loss(lengths, torch.tensor([2])))


def test_kl_is_zero_when_q_is_the_prior_and_half_per_unit_mean():
    z = torch.zeros(3, 5, 7)
    assert torch.equal(kl_standard_normal(z, z), torch.zeros(3, 5))
    # mu = 1 in each of 7 dims, unit variance: 7 * 0.5 (not T/2 or anything else).
    assert kl_standard_normal(torch.ones(1, 7), torch.zeros(1, 7)).item() == 3.5


def test_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.7, -1.2, 0.1], dtype=torch.float64)
    logvar = torch.tensor([-0.5, 0.8, -2.0], dtype=torch.float64)
    sd = torch.exp(0.5 * logvar)
    z = mu + sd * torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    log_q = (-0.5 * ((z - mu) / sd) ** 2 - torch.log(sd) - 0.5 * math.log(2 * math.pi)).sum(1)
    log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    ratio = log_q - log_p
    est, stderr = ratio.mean().item(), ratio.std().item() / math.sqrt(len(ratio))
    kl = kl_standard_normal(mu, logvar).item()
    assert abs(est - kl) < 4 * stderr, (est, kl, stderr)


def test_bernoulli_nll():
    x = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    assert abs(bernoulli_nll(torch.zeros_like(x), x).item() - 4 * math.log(2)) < 1e-5
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]]]])
    p = torch.sigmoid(logits)
    ref = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum()
    torch.testing.assert_close(bernoulli_nll(logits, x), ref.view(1))


def test_discretized_logistic_is_a_distribution_over_256_levels():
    x = (torch.arange(256, dtype=torch.float64) / 255).view(256, 1, 1, 1)
    for logit in (0.3, -2.0, 4.0):
        for log_s in (-6.0, -3.0, -1.0):
            nll = discretized_logistic_nll(torch.full_like(x, logit), torch.tensor([log_s], dtype=torch.float64), x)
            assert abs(torch.exp(-nll).sum().item() - 1) < 1e-6
    # A middle bin: P = sigmoid((x + 1/510 - m)/s) - sigmoid((x - 1/510 - m)/s).
    m, s, xv = torch.sigmoid(torch.tensor(0.3, dtype=torch.float64)), math.exp(-3.0), 100 / 255
    p = torch.sigmoid((xv + 0.5 / 255 - m) / s) - torch.sigmoid((xv - 0.5 / 255 - m) / s)
    got = discretized_logistic_nll(torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64),
                                   torch.tensor([-3.0], dtype=torch.float64),
                                   torch.full((1, 1, 1, 1), xv, dtype=torch.float64))
    assert abs(got.item() + math.log(p.item())) < 1e-9


def test_bits_per_dim():
    assert abs(bits_per_dim(784 * math.log(2), 784) - 1.0) < 1e-12
