"""The latent noise: a counter-based hash of (seed, sample index, t, d) turned into normals with
tensor ops, on the device the step runs on. Its cost against a `small` step is a benchmark
(`rcn bench --workload noise`, docs/performance.md), not a test."""

import math

import torch

from rcn_dist.config import preset
from rcn_dist.model import noise_for, sample_noise
from rcn_dist.model.rcn import _GOLDEN, _mix64, _mix64_


def test_the_tensor_hash_is_splitmix64_bit_for_bit():
    """torch's >> on int64 is arithmetic; the tensor mix masks it into the logical shift. Values
    with the top bit set (negative as int64) are where the two would differ."""
    vals = [0, 1, 2, 12345, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0xDEADBEEFCAFEBABE, _GOLDEN]
    as_int64 = torch.tensor([v - (1 << 64) if v >> 63 else v for v in vals], dtype=torch.int64)
    got = [int(v) & ((1 << 64) - 1) for v in _mix64_(as_int64.clone()).tolist()]
    assert got == [_mix64(v) for v in vals]


def test_an_entry_does_not_depend_on_T_z_dim_or_the_batch():
    a = sample_noise(torch.tensor([3, 9]), seed=5, T=4, z_dim=6)
    b = sample_noise(torch.tensor([9, 3, 11]), seed=5, T=10, z_dim=16)
    assert torch.equal(a[0], b[1, :4, :6]) and torch.equal(a[1], b[0, :4, :6])


def test_the_noise_is_standard_normal_and_uncorrelated():
    z = sample_noise(torch.arange(2048), seed=11, T=16, z_dim=16).double()  # 524,288 draws
    flat = z.flatten()
    n = flat.numel()
    assert abs(flat.mean()) < 4 / math.sqrt(n) and abs(flat.var() - 1) < 4 * math.sqrt(2 / n)
    # Kolmogorov-Smirnov against Phi: D below its 0.1% critical value 1.95 / sqrt(n).
    s, _ = flat.sort()
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert torch.maximum(ranks - cdf, cdf - (ranks - 1 / n)).max() < 1.95 / math.sqrt(n)
    # Neighbouring indices, steps and dimensions: correlations at the 1/sqrt(n) noise level.
    for a, b in ((z[1:], z[:-1]), (z[:, 1:], z[:, :-1]), (z[..., 1:], z[..., :-1])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(r) < 5 / math.sqrt(a.numel()), r
    # A different seed gives unrelated noise for the same samples.
    other = sample_noise(torch.arange(2048), seed=12, T=16, z_dim=16).double().flatten()
    assert abs(torch.corrcoef(torch.stack([flat, other]))[0, 1]) < 5 / math.sqrt(n)


def test_noise_for_draws_on_the_given_device_in_fp32():
    cfg = preset("tiny")
    batch = {"index": torch.tensor([4, 1, 7])}
    eps = noise_for(batch, 3, cfg, device="meta")
    assert eps.device.type == "meta" and eps.shape == (3, cfg.model.T, cfg.model.z_dim)
    on_host = noise_for(batch, 3, cfg)
    assert on_host.dtype == torch.float32 and torch.isfinite(on_host).all()
    assert torch.equal(on_host, sample_noise(batch["index"], 3, cfg.model.T, cfg.model.z_dim))
