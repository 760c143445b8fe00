"""What the latent path z_{1:T} carries about x: the rate per step, active units and I_q(x; z).

DRAW's posterior is sequential: q(z_t | x, z_{<t}) = N(mu_t, sigma_t^2), where mu_t and sigma_t
depend on x and, through h_dec and the canvas, on the path drawn so far. So E_q[z_t | x], which
active units are defined on, averages mu_t over the noise of z_{<t}, and q(z_{1:T} | x') of a path
drawn for another image x' is a product over steps with that path fed back into the decoder.
docs/evaluation.md says how to read each figure. Single-device: the caller sums over ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rcn_dist.model.attention import window_area
from rcn_dist.model.precision import wide_dtype
from rcn_dist.model.rcn import hidden

ACTIVE_THRESHOLD = 0.01
"""A latent unit is active when the variance over x of its posterior mean exceeds this (Burda et
al. 2016)."""
PAIR_ROWS = 8192
"""Most (path, image) pairs the MI estimator runs through the encoder at once (memory: each row
holds an image and a canvas)."""
_LOG_2PI = math.log(2 * math.pi)


def _caps_flat(model, x: Tensor, x_caps: Tensor | None) -> Tensor:
    """The encoder capsules of x as RNN_enc reads them, (B, n_classes * class_caps_dim), or (B, 0)
    without them: what RCN.forward computes once per image."""
    if model.encoder.capsules is None:
        return x.new_zeros(len(x), 0)
    return model.encoder.capsules(x if x_caps is None else x_caps).flatten(1)


def _moments(outs: list) -> dict[str, Tensor]:
    """posterior_sums from the two forward passes' outputs (RCNOutput)."""
    mu = [o.mu.double().cpu() for o in outs]  # 2 x (B, T, z)
    m = (mu[0] + mu[1]) / 2
    return {"kl": sum(o.kl.double().cpu() for o in outs).sum(0) / 2, "m": m.sum(0), "m2": m.pow(2).sum(0),
            "w": ((mu[0] - mu[1]).pow(2) / 2).sum(0), "n": torch.tensor(float(len(m)), dtype=torch.float64)}


@torch.no_grad()
def posterior_sums(model, x: Tensor, eps: tuple[Tensor, Tensor], x_caps: Tensor | None = None) -> dict[str, Tensor]:
    """Sums over the batch x (B, C, H, W) of what `information_figures` needs, float64 on the CPU,
    from two posterior paths per image (eps: two (B, T, z_dim) noise draws):

    - kl (T,): KL(q(z_t | x, z_{<t}) || N(0, I)) per step, averaged over the two paths;
    - m, m2 (T, z_dim): the two paths' mean of mu_t, and its square;
    - w (T, z_dim): (mu_t^(1) - mu_t^(2))^2 / 2, an unbiased estimate of the variance of mu_t over
      the noise of z_{<t} for this image (0 at t = 1, which sees no earlier step);
    - n: the images.
    """
    return _moments([model(x, e, x_caps) for e in eps])


@torch.no_grad()
def batch_information(model, x: Tensor, eps: tuple[Tensor, Tensor], x_caps: Tensor | None = None) -> dict[str, float]:
    """The training loop's one-batch figures (rcn_dist.evaluation.evaluate): info_active_units of this
    batch (information_figures over its B images, two paths each: a noisier count than `rcn
    eval`'s over the test set) and, with write attention, info_write_area, the mean share of the
    image the write window covers (rcn_dist.model.attention.window_area) over steps and images while the
    model reconstructs x."""
    outs = [model(x, e, x_caps) for e in eps]
    out: dict[str, float] = {"info_active_units": information_figures(_moments(outs))["info_active_units"]}
    win, c = outs[0].write_windows, model.cfg
    if win is not None:
        out["info_write_area"] = window_area(win["cx"], win["cy"], win["delta"], c.write_n, c.height,
                                             c.width).mean().item()
    return out


def information_figures(sums: dict[str, Tensor]) -> dict[str, float | int | list]:
    """The rate and active units from `posterior_sums` summed over batches (and ranks).

    The variance over x of E_q[z_t | x] is estimated by the law of total variance: the variance
    over images of the two paths' mean m_x holds Var_x(E[mu_t | x]) plus half the within-image
    variance, which w estimates, so Var_x(E[mu_t | x]) ~ Var_x(m_x) - mean_x(w) / 2. Without the
    correction, noise that moves mu_t for t > 1 would count as information about x.
    """
    n = sums["n"].item()
    mean = sums["m"] / n
    var = (sums["m2"] / n - mean.pow(2)) - sums["w"] / n / 2  # (T, z)
    active = var > ACTIVE_THRESHOLD
    rate = (sums["kl"] / n).tolist()
    return {"info_n": int(n), "info_rate_steps": rate, "info_rate": float(sum(rate)),
            "info_active_units_steps": active.sum(1).tolist(), "info_active_units": int(active.sum()),
            "info_units": int(active.numel())}


@torch.no_grad()
def path_log_q(model, x: Tensor, z: Tensor, x_caps: Tensor | None = None) -> Tensor:
    """log q(z_i | x_j) for every path i and image j: (P, N), float64, nats.

    x (N, C, H, W) images; z (P, T, z_dim) paths, path i drawn from q(. | x_i) (P <= N), so that
    out[i, i] is each path's own log q. The decoder runs once per path (its state and canvas
    depend on the path alone) and the encoder once per (path, image) pair: log q(z_i | x_j) =
    sum_t log N(z_{i,t}; mu_t, sigma_t^2) with (mu_t, sigma_t) the encoder's for image j after the
    decoder has drawn z_{i,<t}.
    """
    enc, dec = model.encoder, model.decoder
    paths, steps, zd = z.shape
    n = len(x)
    caps = _caps_flat(model, x, x_caps)
    out = torch.empty(paths, n, dtype=torch.float64)
    block = max(1, PAIR_ROWS // n)  # paths per chunk: block * N pair rows
    for i0 in range(0, paths, block):
        zi = z[i0:i0 + block]  # (P', T, z)
        p = len(zi)
        dec_state = dec.init_state(p, x)
        canvas = torch.zeros(p, *x.shape[1:], dtype=wide_dtype(x.dtype), device=x.device)  # c_0 = 0
        # Row r = a * N + j pairs path i0 + a with image j.
        xj, cj = x.repeat(p, 1, 1, 1), caps.repeat(p, 1)
        enc_state = enc.init_state(p * n, x)
        noise = x.new_zeros(p * n, zd, dtype=torch.float32)  # the encoder's own z is not used
        logq = torch.zeros(p * n, dtype=torch.float64, device=x.device)
        for t in range(steps):
            enc_state, _, mu, logvar, _ = enc.step(xj, cj, canvas.repeat_interleave(n, 0),
                                                   hidden(dec_state).repeat_interleave(n, 0), enc_state, noise)
            zt = zi[:, t].repeat_interleave(n, 0).to(mu.dtype)  # (P' * N, z)
            logq -= 0.5 * (_LOG_2PI + logvar + (zt - mu).pow(2) * torch.exp(-logvar)).double().sum(1)
            dec_state, canvas, _ = dec.step(zi[:, t], dec_state, canvas)
        out[i0:i0 + p] = logq.view(p, n).cpu()
    return out


@torch.no_grad()
def mutual_information_terms(model, x: Tensor, eps: Tensor, x_caps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-path terms (P,) of two estimates of I_q(x; z_{1:T}) = E_x KL(q(z|x) || q(z)), q(z) the
    aggregate posterior (the "index-code mutual information" of Hoffman & Johnson's ELBO surgery:
    rate = I_q + KL(q(z) || p(z))), q(z) approximated by a mixture of the N posteriors of the
    images x (N, C, H, W), from one path z_i ~ q(. | x_i) for each of the first P images (noise
    eps (P, T, z), P <= N):

    - lower: log q(z_i | x_i) - log (1/N sum_j q(z_i | x_j)), the mixture of all N posteriors,
      the path's own included. This is InfoNCE with the critic log q(z | x) (Poole et al. 2019),
      a lower bound on I_q in expectation for every i, and never above log N: it saturates there
      when the posteriors of different images no longer overlap.
    - upper: the same with the mixture of the other N - 1 posteriors (leave-one-out), an upper
      bound in expectation, which grows without bound as the posteriors separate.

    Both bounds hold for each path alone, so P paths (P * N encoder passes) average them as well
    as N would (N^2 passes): N sets how far the lower bound can reach, P only its noise. For a
    posterior that ignores x both are 0 exactly; I_q lies between their means.
    """
    n, p = len(x), len(eps)
    if n < 2:
        raise ValueError("the MI estimate needs at least two images")
    if not 1 <= p <= n:
        raise ValueError(f"the MI estimate takes 1 to {n} paths (one per image), got {p}")
    xc = None if x_caps is None else x_caps[:p]
    out = model(x[:p], eps, xc)
    z = out.mu + torch.exp(0.5 * out.logvar) * eps.to(out.mu.dtype)
    lq = path_log_q(model, x, z, x_caps)  # (P, N)
    own = lq.diagonal()  # (P,): lq[i, i]
    lower = own - (torch.logsumexp(lq, 1) - math.log(n))
    others = lq.masked_fill(torch.eye(p, n, dtype=torch.bool), float("-inf"))
    upper = own - (torch.logsumexp(others, 1) - math.log(n - 1))
    return lower, upper
