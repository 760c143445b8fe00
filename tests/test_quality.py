"""The measures behind `rcn eval`'s information and sample-quality figures, each against a case
whose answer is known: posteriors that ignore x or pin it down, copies of training images and
unseen ones, sets a classifier can or cannot tell apart, windows of a known extent."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import FMNIST, rcn

from rcn_dist import information, quality
from rcn_dist.config import EvalConfig, preset
from rcn_dist.data.loader import EvalStream, load_arrays
from rcn_dist.errors import DataError
from rcn_dist.model import RCN
from rcn_dist.sample import window_area, window_figures


def grey(a) -> torch.Tensor:
    return torch.from_numpy(a).float() / 255


def tiny(seed: int = 0) -> RCN:
    torch.manual_seed(seed)
    return RCN(preset("tiny").model).eval()


def ignoring_x(model: RCN) -> RCN:
    """The latent head reads nothing: mu and logvar are its bias, the same for every image and path."""
    with torch.no_grad():
        model.encoder.latent.weight.zero_()
        model.encoder.latent.bias.normal_(0.0, 1.0)
    return model


def pinning_x(model: RCN) -> RCN:
    """A near-deterministic posterior whose means differ widely between images: sigma = e^-6."""
    z = model.cfg.z_dim
    with torch.no_grad():
        model.encoder.latent.weight[:z] *= 20.0
        model.encoder.latent.weight[z:].zero_()
        model.encoder.latent.bias[z:].fill_(-12.0)
    return model


@pytest.fixture(scope="module")
def batch(fmnist_small):
    b = next(iter(EvalStream(fmnist_small, 64, 0, 1)))
    return b["image"], b["grey"], b["index"]


def _eps(model: RCN, idx: torch.Tensor, seed: int) -> torch.Tensor:
    from rcn_dist.model import sample_noise

    return sample_noise(idx, seed, model.cfg.T, model.cfg.z_dim)


# ---------------------------------------------------------------- active units and the rate
def test_active_units_of_a_posterior_that_ignores_x_is_0_and_of_one_that_pins_it_all(batch):
    x, xc, idx = batch
    eps = (_eps(tiny(), idx, 1), _eps(tiny(), idx, 2))
    figs = information.information_figures(information.posterior_sums(ignoring_x(tiny()), x, eps, xc))
    assert figs["info_active_units"] == 0 and figs["info_active_units_steps"] == [0] * 4
    assert figs["info_units"] == 4 * 8 and figs["info_n"] == 64
    model = pinning_x(tiny())
    figs = information.information_figures(information.posterior_sums(model, x, eps, xc))
    assert figs["info_active_units"] == figs["info_units"] == 32 and figs["info_active_units_steps"] == [8] * 4
    # The rate per step is the model's own KL per step, averaged over the two paths.
    with torch.no_grad():
        kl = sum(model(x, e, xc).kl.double() for e in eps).mean(0) / 2
    assert figs["info_rate_steps"] == pytest.approx(kl.tolist(), rel=1e-9)
    assert figs["info_rate"] == pytest.approx(float(kl.sum()), rel=1e-9)


def test_active_units_do_not_count_variation_that_only_the_noise_causes():
    """mu_t moved by the path's noise alone (the same law for every x): 0 active units, where
    the variance of one path's mu_t over images would count every unit."""
    g = torch.Generator().manual_seed(0)
    b, t, z = 20000, 3, 5
    outs = [SimpleNamespace(mu=0.3 * torch.randn(b, t, z, generator=g), kl=torch.zeros(b, t)) for _ in range(2)]
    figs = information.information_figures(information._moments(outs))
    assert figs["info_active_units"] == 0
    assert outs[0].mu.var(0).min() > 0.08  # one path alone: every unit "active"
    # Add a part that depends on the image (shared by both paths): now every unit is active.
    signal = torch.randn(b, t, z, generator=g) * 0.3
    for o in outs:
        o.mu = o.mu + signal
    assert information.information_figures(information._moments(outs))["info_active_units"] == t * z


# ---------------------------------------------------------------- I_q(x; z)
def test_path_log_q_diagonal_is_each_paths_own_log_q(batch):
    x, xc, idx = batch
    model = tiny()
    with torch.no_grad():
        model.encoder.latent.bias.normal_(0.0, 1.0)
    eps = _eps(model, idx[:12], 3)
    out = model(x[:12], eps, xc[:12])
    z = out.mu + torch.exp(0.5 * out.logvar) * eps
    lq = information.path_log_q(model, x[:12], z, xc[:12])
    own = (-0.5 * (math.log(2 * math.pi) + out.logvar + eps.pow(2))).double().flatten(1).sum(1)
    assert torch.allclose(lq.diagonal(), own, rtol=1e-5, atol=1e-4)
    # Chunked over paths (PAIR_ROWS) or not, the same numbers; fewer paths than images, the same rows.
    information.PAIR_ROWS, keep = 30, information.PAIR_ROWS
    try:
        assert torch.allclose(information.path_log_q(model, x[:12], z, xc[:12]), lq, rtol=1e-6, atol=1e-6)
        assert torch.allclose(information.path_log_q(model, x[:12], z[:5], xc[:12]), lq[:5], rtol=1e-6, atol=1e-6)
    finally:
        information.PAIR_ROWS = keep


def test_mi_is_0_for_a_posterior_independent_of_x_and_log_batch_for_a_deterministic_one(batch):
    x, xc, idx = batch
    m, paths = 48, 8  # a mixture of 48 posteriors, paths from the first 8 images
    eps = _eps(tiny(), idx[:paths], 4)
    lower, upper = information.mutual_information_terms(ignoring_x(tiny()), x[:m], eps, xc[:m])
    assert lower.shape == upper.shape == (paths,)
    assert lower.abs().max() < 1e-6 and upper.abs().max() < 1e-6
    lower, upper = information.mutual_information_terms(pinning_x(tiny()), x[:m], eps, xc[:m])
    assert (lower <= math.log(m) + 1e-9).all()
    assert lower.mean().item() == pytest.approx(math.log(m), abs=1e-3)  # the bound, saturated
    assert upper.mean().item() > 10 * math.log(m)  # the leave-one-out bound: far above
    # An ordinary posterior lies in between, the two estimates bracketing the truth.
    model = tiny()
    with torch.no_grad():
        model.encoder.latent.weight.mul_(3.0)
    lower, upper = information.mutual_information_terms(model, x[:m], eps, xc[:m])
    assert 0.05 < lower.mean().item() < upper.mean().item() and lower.mean().item() < math.log(m) - 0.05
    with pytest.raises(ValueError, match="paths"):
        information.mutual_information_terms(model, x[:4], eps, xc[:4])  # 8 paths, 4 images


# ---------------------------------------------------------------- the write window
def test_window_area_is_the_windows_share_of_the_image_clipped():
    n, size = 5, 28
    whole = window_area(torch.tensor([14.5]), torch.tensor([14.5]), torch.tensor([28 / 5]), n, size, size)
    assert whole.item() == pytest.approx(1.0)
    bigger = window_area(torch.tensor([14.5]), torch.tensor([14.5]), torch.tensor([20.0]), n, size, size)
    assert bigger.item() == pytest.approx(1.0)  # clipped to the image
    small = window_area(torch.tensor([10.0]), torch.tensor([12.0]), torch.tensor([0.8]), n, size, size)
    assert small.item() == pytest.approx(16 / 784)  # 4 x 4 pixels inside
    edge = window_area(torch.tensor([0.5]), torch.tensor([14.5]), torch.tensor([2.0]), n, size, size)
    assert edge.item() == pytest.approx(5 * 10 / 784)  # half of 10 px wide lies left of the image
    outside = window_area(torch.tensor([-20.0]), torch.tensor([14.5]), torch.tensor([1.0]), n, size, size)
    assert outside.item() == 0.0
    figs = window_figures({"cx": torch.tensor([[14.5, 10.0]] * 3), "cy": torch.tensor([[14.5, 12.0]] * 3),
                           "delta": torch.tensor([[28 / 5, 0.8]] * 3)}, n, size, size)
    assert figs["window_area_steps"] == pytest.approx([1.0, 16 / 784])
    assert figs["window_x_steps"] == pytest.approx([14.0, 9.5]) and figs["window_y_steps"] == pytest.approx([14.0, 11.5])
    assert figs["window_samples"] == 3


# ---------------------------------------------------------------- classifier two-sample test
def test_two_sample_test_cannot_tell_test_images_apart_and_sees_a_shifted_mean(fmnist_small):
    test, _, _ = load_arrays(fmnist_small, "test")
    x = grey(test)
    same = quality.two_sample_test(x[:256], x[256:], seed=0)
    assert same["n"] == 256
    assert 0.4 < same["acc"] < 0.6 and same["acc_low"] < 0.5 < same["acc_high"], same
    shifted = quality.two_sample_test(x[:256], (x[256:] + 0.2).clamp(0, 1), seed=0)
    assert shifted["acc"] > 0.95 and shifted["acc_low"] > 0.9, shifted


def test_wilson_interval():
    lo, hi = quality.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = quality.wilson_interval(100, 100)
    assert hi == pytest.approx(1.0) and 0.96 < lo < 0.97


# ---------------------------------------------------------------- nearest neighbours, data copying
def test_data_copying_is_strongly_negative_for_copies_and_near_0_for_unseen_images(fmnist_small):
    train, _, _ = load_arrays(fmnist_small, "train")
    test, _, _ = load_arrays(fmnist_small, "test")
    tr, te = grey(train).flatten(1), grey(test).flatten(1)
    cent = quality.kmeans(tr, 5, seed=0)
    assert cent.shape == (5, 784)

    def c_t(gen: torch.Tensor) -> dict:
        found = quality.search_training_set(torch.cat([gen, te[:256]]), tr.split(100), centroids=cent)
        d, c = found["cell_dist"], found["cells"]
        assert found["seen"] == 512 and torch.isfinite(d).all()
        # The in-cell distance is never below the distance to the nearest image anywhere.
        assert (d >= found["dist"] - 1e-12).all()
        return quality.data_copying(d[:256], c[:256], d[256:], c[256:], 5)

    copies = c_t(tr[100:356])
    assert copies["copy_zu"] < -5 and copies["copy_cells_used"] >= 3, copies
    unseen = c_t(te[256:512])
    assert abs(unseen["copy_zu"]) < 2.5 and unseen["copy_cells_used"] >= 3, unseen


def test_mann_whitney_z():
    a, b = torch.arange(30.0), torch.arange(30.0) + 100
    assert quality.mann_whitney_z(a, b) < -6 < 6 < quality.mann_whitney_z(b, a)
    # Ties count half: identical sets sit at U = mn/2, Z = the continuity correction alone.
    assert quality.mann_whitney_z(a, a) == pytest.approx(0.5 / math.sqrt(30 * 30 * 61 / 12))


# ---------------------------------------------------------------- Frechet interval, class histogram
def test_frechet_interval_brackets_the_distance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(800, 4, generator=g), torch.randn(800, 4, generator=g) + 0.5
    fd = quality.frechet_distance(a, b)
    lo, hi = quality.frechet_interval(a, b, 60, seed=1)
    assert lo < fd < hi and hi - lo < fd and fd == pytest.approx(1.0, abs=0.25)


def test_class_histogram_shares_kl_and_rarest_class():
    names = ["a", "b", "c"]
    onehot = torch.eye(3)
    gen = onehot[torch.tensor([0, 0, 0, 1])]
    test = onehot[torch.tensor([0, 1, 2, 0, 1, 2])]
    h = quality.class_histogram(gen, test, names)
    assert h["class_shares"] == [0.75, 0.25, 0.0] and h["class_shares_test"] == pytest.approx([1 / 3] * 3)
    assert h["class_min_share"] == 0.0 and h["class_rarest"] == "c"
    assert h["class_kl"] == pytest.approx(0.75 * math.log(2.25) + 0.25 * math.log(0.75))
    assert quality.class_histogram(test, test, names)["class_kl"] == pytest.approx(0.0)


# ---------------------------------------------------------------- the feature classifier
def test_feature_classifier_is_cached_beside_the_shards(fmnist_small, tmp_path):
    cache = quality.classifier_dir(fmnist_small, tmp_path)
    assert cache == fmnist_small / "feature_classifier"
    net, info = quality.feature_classifier(fmnist_small, tmp_path / "clf", steps=8)
    assert info["trained"] and 0.0 <= info["test_accuracy"] <= 1.0 and "val_accuracy" not in info
    meta = json.loads((tmp_path / "clf" / "meta.json").read_text())
    assert meta["accuracy"]["test_accuracy"] == info["test_accuracy"] and meta["identity"]["steps"] == 8
    again, info2 = quality.feature_classifier(fmnist_small, tmp_path / "clf", steps=8)
    assert not info2["trained"] and info2["test_accuracy"] == info["test_accuracy"]
    for (k, v), w in zip(net.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k
    _, info3 = quality.feature_classifier(fmnist_small, tmp_path / "clf", steps=9)  # another recipe
    assert info3["trained"]
    _, info4 = quality.feature_classifier(fmnist_small, tmp_path / "clf", steps=9)  # and it replaced the old one
    assert not info4["trained"]
    assert quality.features(again, grey(load_arrays(fmnist_small, "test", limit=5)[0])).shape == (5, 128)


@pytest.mark.parametrize("damage", ["meta_garbage", "meta_not_a_dict", "weights_garbage", "weights_missing",
                                    "weights_of_another_net"])
def test_a_corrupt_classifier_cache_is_an_error_naming_it(fmnist_small, tmp_path, damage):
    cache = tmp_path / "clf"
    quality.feature_classifier(fmnist_small, cache, steps=2)
    meta, weights = cache / "meta.json", cache / "model.safetensors"
    if damage == "meta_garbage":
        meta.write_text('{"identity": {"dataset": "fash')  # cut short
    elif damage == "meta_not_a_dict":
        meta.write_text("[1, 2]")
    elif damage == "weights_garbage":
        weights.write_bytes(b"\x00" * 100)
    elif damage == "weights_missing":
        weights.unlink()
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(3)}, str(weights))
    with pytest.raises(DataError, match=r"feature classifier cache .* is corrupt .*delete that directory") as e:
        quality.feature_classifier(fmnist_small, cache, steps=2)
    assert "\n" not in str(e.value) and str(cache) in str(e.value)


@pytest.fixture(scope="session")
def fmnist_full(tmp_path_factory):
    """The whole of Fashion-MNIST (55,000 training, 5,000 validation, 10,000 test images)."""
    if not FMNIST.is_dir():
        pytest.fail(f"{FMNIST} is missing: install Debian's dataset-fashion-mnist (.ci/run does)")
    out = tmp_path_factory.mktemp("data") / "fmnist_full"
    rcn("prepare", "--dataset", "fashion-mnist", "--out", out)
    return out


@pytest.mark.slow
def test_feature_classifier_reaches_90_percent_on_the_test_set(fmnist_full, tmp_path):
    """The default recipe (about 50 s on one CPU thread), chosen on the validation split."""
    _, info = quality.feature_classifier(fmnist_full, tmp_path / "clf", EvalConfig().classifier_steps)
    assert info["test_accuracy"] >= 0.90 and info["val_accuracy"] >= 0.90, info
