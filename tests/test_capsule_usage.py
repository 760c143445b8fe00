"""Capsule usage: the ablation and spread figures of `rcn eval`'s capsules part mean what they say.

A decoder whose capsules are forced to a constant must score no information; a trained tiny model
must score clearly more; the figure must equal what a reader gets with a forward hook of their
own on `RCN.decoder.capsules`; and the decoder capsule network is odd in z, so that no choice of
its weights makes its output the same for every z.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rcn_dist.config import preset
from rcn_dist.data.loader import EvalStream, load_arrays
from rcn_dist.eval import capsule_usage
from rcn_dist.model import RCN
from rcn_dist.model.usage import spread

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _train_tiny(data_dir, steps: int, **model_kw) -> tuple[RCN, object]:
    """A tiny RCN trained in-process on the fixture's 512 images (dynamic binarisation)."""
    cfg = preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, **model_kw)
    torch.manual_seed(0)
    model = RCN(cfg.model)
    images, labels = load_arrays(data_dir, "train")[:2]
    x_all = torch.from_numpy(images).float().div(255)
    y_all = torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (32,), generator=gen)
        # The capsules see the grey image, the rest its binarised draw (data.caps_input="grey").
        loss, _ = model.loss(torch.bernoulli(x_all[idx], generator=gen), y_all[idx], x_caps=x_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cfg


def _stream(data_dir):
    return EvalStream(data_dir, 64, 0, 1, binarize="dynamic", seed=0)


@pytest.fixture(scope="module")
def trained(fmnist_small):
    return _train_tiny(fmnist_small, 150, dec_z_skip=False)


@pytest.mark.slow
def test_constant_decoder_capsules_score_no_information(fmnist_small, trained):
    model, cfg = trained
    # Force the decoder capsules to one image's output for every image: a learned constant.
    h = model.decoder.capsules.register_forward_hook(lambda _m, _i, out: out[:1].expand_as(out).clone())
    try:
        figs = capsule_usage(model, _stream(fmnist_small), cfg, "cpu")
    finally:
        h.remove()
    assert figs["caps_n"] == 512
    assert abs(figs["caps_decoder_shuffle"]) < 1e-4
    assert figs["caps_decoder_spread"] < 1e-6


@pytest.mark.slow
def test_trained_tiny_model_carries_the_image_through_its_decoder_capsules(fmnist_small, trained):
    model, cfg = trained
    figs = capsule_usage(model, _stream(fmnist_small), cfg, "cpu")
    assert figs["caps_decoder_shuffle"] > 5.0, figs  # nats per image
    assert figs["caps_decoder_spread"] > 0.3, figs
    assert 0 < figs["caps_decoder_length"] < 1 and 0 < figs["caps_encoder_length"] < 1

    # A reader's own measurement: roll the decoder capsules' outputs across the batch with a hook.
    from rcn_dist.evaluation import EVAL_NOISE_SEED
    from rcn_dist.model import sample_noise

    diffs = []
    for batch in _stream(fmnist_small):
        x, y, grey = (batch[k][batch["mask"]] for k in ("image", "label", "grey"))
        eps = sample_noise(batch["index"][batch["mask"]], cfg.train.seed + EVAL_NOISE_SEED, cfg.model.T,
                           cfg.model.z_dim)
        with torch.no_grad():
            base = model.loss_terms(x, y, eps, x_caps=grey)["elbo"]
            h = model.decoder.capsules.register_forward_hook(lambda _m, _i, out: out.roll(1, 0))
            try:
                shuffled = model.loss_terms(x, y, eps, x_caps=grey)["elbo"]
            finally:
                h.remove()
        diffs.append(shuffled - base)
    assert torch.cat(diffs).mean().item() == pytest.approx(figs["caps_decoder_shuffle"], rel=1e-5)


def test_decoder_capsules_are_odd_in_z_so_they_cannot_be_a_constant():
    """The capsule network and what RNN_dec reads of it (the bias-free layer norm after it) are
    both odd in z, whatever their weights."""
    cfg = preset("small").model
    torch.manual_seed(0)
    dec = RCN(cfg).decoder.double()
    caps, norm = dec.capsules, dec.caps_norm
    assert norm is not None and norm.bias is None

    def rnn_input(z):
        return norm(caps(z).flatten(1))  # (B, dec_caps * dec_caps_dim)

    z = torch.randn(64, cfg.z_dim, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(caps(-z), -caps(z))
        torch.testing.assert_close(rnn_input(-z), -rnn_input(z))
        # Whatever the weights: push every parameter far off its initial value and check again.
        for p in [*caps.parameters(), *norm.parameters()]:
            p.add_(torch.randn_like(p) * 3)
        out = caps(z)
        torch.testing.assert_close(caps(-z), -out)
        torch.testing.assert_close(rnn_input(-z), -rnn_input(z))
    assert spread(out) > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "cifar10", "multimnist"])
def test_paper_size_presets_train_with_decoder_capsules_that_vary_with_the_image(name):
    """A few CPU steps of each paper-size preset (tiny batch): the decoder capsules' outputs differ
    from image to image (today's fix holds at paper size, not only in `small`)."""
    from rcn_dist.model.usage import capsule_stats

    cfg = preset(name).model
    torch.manual_seed(0)
    model = RCN(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    shape = (2, cfg.in_channels, cfg.height, cfg.width)
    y = torch.tensor([0, 1])
    for _ in range(2):
        x = torch.rand(shape, generator=gen)
        x = x.round() if cfg.likelihood == "bernoulli" else (x * 255).round() / 255
        loss, parts = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    stats = capsule_stats(model, x, torch.randn(2, cfg.T, cfg.z_dim, generator=gen))
    assert stats["decoder_spread"] > 0.3, stats
    assert 0.05 < stats["decoder_length"] < 0.999, stats
