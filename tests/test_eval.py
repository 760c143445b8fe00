"""`rcn eval`: the IW bound's maths, the memorisation check, the Frechet distance, refusals, and a
tiny trained run evaluated on 1 and 2 ranks against the training loop's own test figures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PY, cli_env, metrics, rcn, run
from safetensors.torch import save_file

from rcn_dist import cli, quality
from rcn_dist.config import apply_overrides, preset
from rcn_dist.data.loader import EvalStream, load_arrays
from rcn_dist.eval import importance_weighted, information, log_weights, sample_quality
from rcn_dist.model import RCN, sample_noise
from rcn_dist.parallel.env import free_port


def tiny_model(seed: int = 0, spread_latent: bool = True) -> RCN:
    """A tiny RCN whose posterior is far from the prior (so that KL and the IW gap are large)."""
    torch.manual_seed(seed)
    model = RCN(preset("tiny").model).eval()
    if spread_latent:
        with torch.no_grad():
            model.encoder.latent.bias.normal_(0.0, 1.0)
    return model


def write_checkpoint(run_dir: Path, model: RCN, cfg, step: int = 1) -> Path:
    """The checkpoint layout of rcn_dist.parallel.checkpoint: config + consolidated weights."""
    d = run_dir / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(cfg.to_json())
    (d / "COMPLETE").write_text(json.dumps({"step": step}))
    (run_dir / "checkpoints" / "latest").write_text(d.name)
    (run_dir / "config.json").write_text(cfg.to_json())
    return d


# ---------------------------------------------------------------- the importance-weighted bound
@torch.no_grad()
def test_log_weights_average_to_recon_plus_analytic_kl(fmnist_small):
    """E_q[-log w] = recon + KL: the per-sample log p(z) - log q(z|x) of the whole z_{1:T} is right."""
    model = tiny_model()
    batch = next(iter(EvalStream(fmnist_small, 4, 0, 1)))
    x = batch["image"].repeat(64, 1, 1, 1)  # 64 draws of each of 4 images
    eps = torch.randn(len(x), model.cfg.T, model.cfg.z_dim, generator=torch.Generator().manual_seed(1))
    terms = model.loss_terms(x, batch["label"].repeat(64), eps)
    kl_mc = (-log_weights(model, x, eps) - terms["recon"]).view(64, 4).double()
    kl = terms["kl"].view(64, 4)[0].double()
    assert kl.min() > 5  # the posterior really differs from the prior
    stderr = kl_mc.std(0) / math.sqrt(64)
    assert ((kl_mc.mean(0) - kl).abs() < 4 * stderr + 1e-3).all(), (kl_mc.mean(0), kl, stderr)


def test_iw_bound_equals_the_elbo_for_one_sample_and_is_tighter_for_more(fmnist_small):
    cfg = preset("tiny")
    model = tiny_model()
    one = importance_weighted(model, EvalStream(fmnist_small, 16, 0, 1), cfg, "cpu", k=1, examples=16)
    assert one["iw_n"] == 16 and one["iw_k"] == 1
    assert one["iw_nll"] == one["iw_elbo_mc"]  # exactly: log-mean-exp of one number is that number
    # Sample 0 is the evaluation noise: the one-sample bound is -log w under exactly that noise.
    first = next(iter(EvalStream(fmnist_small, 16, 0, 1)))
    x, idx = first["image"], first["index"]
    assert idx.tolist() == list(range(16))
    from rcn_dist.evaluation import EVAL_NOISE_SEED

    eps = sample_noise(idx, cfg.train.seed + EVAL_NOISE_SEED, cfg.model.T, cfg.model.z_dim)
    with torch.no_grad():
        direct = -log_weights(model, x, eps, first["grey"]).double().mean().item()  # data.caps_input=grey
    assert one["iw_nll"] == pytest.approx(direct, rel=1e-12)

    many = importance_weighted(model, EvalStream(fmnist_small, 16, 0, 1), cfg, "cpu", k=4, examples=16)
    assert many["iw_nll"] < many["iw_elbo_mc"]  # Jensen, strict for a posterior this far off
    assert many["iw_elbo_mc"] - many["iw_nll"] > 0.5


# ---------------------------------------------------------------- Frechet distance
def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.arange(6, dtype=torch.float64)
    assert quality.frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-9)
    # b = 2 (a - mean): covariance 4 S, so FD = |mu|^2 + tr S + 4 tr S - 2 tr(2 S) = |mu|^2 + tr S.
    c = a - a.mean(0)
    expect = float(a.mean(0).pow(2).sum() + torch.cov(a.T).trace())
    assert quality.frechet_distance(a, 2 * c) == pytest.approx(expect, rel=1e-9)


# ---------------------------------------------------------------- nearest neighbours
class ImageModel:
    """A "model" whose samples are given images, in order, one call after the other: to test the
    sample-quality figures end to end on samples whose answer is known."""

    def __init__(self, images: torch.Tensor, cfg) -> None:
        self.images, self.cfg, self.drawn = images, cfg, 0

    def generate(self, n, eps=None, device=None):
        x = self.images[self.drawn:self.drawn + n]
        assert len(x) == n, "asked for more samples than the model holds"
        self.drawn += n
        return x[:, None].expand(-1, self.cfg.T, -1, -1, -1).clone(), None


def grey(a) -> torch.Tensor:
    return torch.from_numpy(a).float() / 255


def test_nearest_neighbours_and_data_copying_flag_a_model_that_returns_training_images(fmnist_small, tmp_path):
    cfg = apply_overrides(preset("tiny"), ["eval.nn_samples=256", "eval.copy_cells=5"])
    train, _, _ = load_arrays(fmnist_small, "train")
    test, _, _ = load_arrays(fmnist_small, "test")

    copier = ImageModel(grey(train[100:356]), cfg.model)
    figs = sample_quality(copier, cfg, str(fmnist_small), tmp_path, "cpu", {"nn"}, pictures=tmp_path)
    assert figs["nn_gen_min"] == 0.0 and figs["nn_gen_median"] == 0.0 and figs["nn_copy_share"] == 1.0
    assert figs["nn_test_median"] > 1.0 and figs["nn_train_images"] == 512  # the whole training split
    assert figs["memorised"] is True
    # Bernoulli draws of training images sit closer to them than binarised unseen images do.
    assert figs["copy_zu"] < -3 and figs["copy_cells_used"] >= 3 and figs["copy_cells"] == 5, figs
    assert (tmp_path / "nearest.png").is_file()

    # Unseen images (the test split's second half) are as far from the training set as test images are.
    honest = ImageModel(grey(test[256:512]), cfg.model)
    figs = sample_quality(honest, cfg, str(fmnist_small), tmp_path, "cpu", {"nn"})
    assert figs["memorised"] is False
    assert 0.5 < figs["nn_ratio"] < 2.0 and figs["nn_gen_min"] > 0.5
    assert abs(figs["copy_zu"]) < 2.5 and figs["copy_cells_used"] >= 3, figs


def test_two_sample_test_and_class_histogram_of_unseen_images_and_of_one_class(fmnist_small, tmp_path):
    cfg = apply_overrides(preset("tiny"), ["eval.c2st_samples=256", "eval.fd_samples=256", "eval.fd_bootstrap=20",
                                           "eval.classifier_steps=40"])
    test, labels, _ = load_arrays(fmnist_small, "test")
    # Unseen images, binarised like the test stream's (a Bernoulli draw): the test cannot tell them
    # from the test images; the control (test images against test images) neither.
    honest = ImageModel(grey(test[256:512]), cfg.model)
    figs = sample_quality(honest, cfg, str(fmnist_small), tmp_path, "cpu", {"c2st", "fd"})
    honest_fd = figs["frechet"]
    assert figs["c2st_n"] == 256 and figs["quality_samples"] == 256
    assert 0.4 < figs["c2st_accuracy"] < 0.62 and 0.4 < figs["c2st_control"] < 0.62, figs
    assert figs["c2st_low"] < figs["c2st_accuracy"] < figs["c2st_high"]
    assert figs["frechet_low"] <= figs["frechet"] <= figs["frechet_high"] and figs["frechet_n"] == 256
    assert len(figs["class_shares"]) == 10 and sum(figs["class_shares"]) == pytest.approx(1.0)
    assert (fmnist_small / "feature_classifier" / "meta.json").is_file()  # cached beside the shards
    # Images of one class, every one brightened: told apart, and nine classes missing.
    bags = grey(test[labels == 8]).repeat(8, 1, 1, 1)[:256]
    figs = sample_quality(ImageModel((bags + 0.3).clamp(0, 1), cfg.model), cfg, str(fmnist_small), tmp_path,
                          "cpu", {"c2st", "fd"})
    assert figs["c2st_accuracy"] > 0.95 and 0.4 < figs["c2st_control"] < 0.62, figs
    assert figs["class_min_share"] == 0.0 and figs["class_kl"] > 1.0
    assert figs["frechet_low"] > 3 * honest_fd, (figs["frechet_low"], honest_fd)


def test_information_part_counts_its_images_and_matches_the_models_kl(fmnist_small):
    cfg = preset("tiny")
    model = tiny_model()
    figs = information(model, EvalStream(fmnist_small, 16, 0, 1), cfg, "cpu", examples=48, mi_examples=40,
                       mi_batch=16, mi_paths=8)
    assert figs["info_n"] == 48 and figs["mi_batch"] == 16
    assert figs["mi_n"] == 16  # two mixtures of 16 images, 8 paths each; the last 8 images: no mixture
    assert figs["mi_lower"] <= figs["mi_log_batch"] == pytest.approx(math.log(16))
    # This untrained posterior barely depends on x: both near 0, far below log 16 (sampling noise: 16 paths).
    assert -0.2 < figs["mi_lower"] < 0.5 and -0.2 < figs["mi_upper"] < 0.5
    assert 0 <= figs["info_active_units"] <= figs["info_units"] == 32
    # The rate is the model's KL under the evaluation noise and IW sample 1's, averaged.
    from rcn_dist.evaluation import EVAL_NOISE_SEED
    from rcn_dist.model import step_noise_seed

    batch = next(iter(EvalStream(fmnist_small, 48, 0, 1)))
    base = cfg.train.seed + EVAL_NOISE_SEED
    with torch.no_grad():
        kl = sum(model(batch["image"], sample_noise(batch["index"], s, 4, 8), batch["grey"]).kl.double()
                 for s in (base, step_noise_seed(base, 1))).mean(0) / 2
    assert figs["info_rate_steps"] == pytest.approx(kl.tolist(), rel=1e-6)


# ---------------------------------------------------------------- refusals
def _eval_cli(capsys, *args) -> tuple[int, list[str]]:
    rc = cli.main(["eval", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_eval_refuses_runs_without_a_usable_checkpoint(fmnist_small, tmp_path, capsys):
    cfg = preset("tiny")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(cfg.to_json())
    rc, err = _eval_cli(capsys, "--run", empty, "--data", fmnist_small)
    assert rc == 2 and len(err) == 1 and "no complete checkpoint" in err[0], err

    rc, err = _eval_cli(capsys, "--run", tmp_path / "nowhere", "--data", fmnist_small)
    assert rc == 2 and len(err) == 1 and "no such run directory" in err[0], err

    # A checkpoint from a different config than the run's own config.json.
    other = tmp_path / "other"
    write_checkpoint(other, tiny_model(spread_latent=False), cfg)
    (other / "config.json").write_text(apply_overrides(cfg, ["model.z_dim=4"]).to_json())
    rc, err = _eval_cli(capsys, "--run", other, "--data", fmnist_small)
    assert rc == 2 and len(err) == 1 and "different model config" in err[0] and "model.z_dim" in err[0], err
    # The check lives in checkpoint.load_model, so `rcn sample` refuses it alike.
    rc = cli.main(["sample", "--run", str(other), "--out", str(tmp_path / "samples")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "different model config" in err[0], err
    assert not (tmp_path / "samples").exists()

    # Weights that do not fit the config saved beside them.
    bad = tmp_path / "bad"
    d = write_checkpoint(bad, tiny_model(spread_latent=False), cfg)
    (d / "config.json").write_text(apply_overrides(cfg, ["model.z_dim=4"]).to_json())
    rc, err = _eval_cli(capsys, "--run", d, "--data", fmnist_small)
    assert rc == 2 and len(err) == 1 and "do not fit" in err[0], err

    # Data that does not fit the model (5 classes against Fashion-MNIST's 10).
    five = apply_overrides(cfg, ["model.n_classes=5"])
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "five", RCN(five.model), five)
    rc, err = _eval_cli(capsys, "--run", tmp_path / "five", "--data", fmnist_small)
    assert rc == 2 and len(err) == 1 and "10 classes" in err[0], err

    # A corrupt feature-classifier cache beside the shards (a copy of them: the shared one stays whole).
    write_checkpoint(tmp_path / "ok", tiny_model(spread_latent=False), cfg)
    data = tmp_path / "data"
    shutil.copytree(fmnist_small, data, ignore=shutil.ignore_patterns("feature_classifier"))
    (data / "feature_classifier").mkdir()
    (data / "feature_classifier" / "meta.json").write_text("{not json")
    rc, err = _eval_cli(capsys, "--run", tmp_path / "ok", "--data", data, "--parts", "fd", "eval.fd_samples=8")
    assert rc == 2 and len(err) == 1 and "feature classifier cache" in err[0] and "corrupt" in err[0], err

    # Too few test images for one mixture of the I_q(x; z) estimate (512 here).
    rc, err = _eval_cli(capsys, "--run", tmp_path / "ok", "--data", fmnist_small, "--parts", "info",
                        "eval.info_examples=8", "eval.mi_examples=0", "eval.mi_batch=1024")
    assert rc == 2 and len(err) == 1 and "eval.mi_batch=1024" in err[0], err
    rc, err = _eval_cli(capsys, "--run", tmp_path / "ok", "--data", fmnist_small, "--parts", "info",
                        "eval.mi_paths=300", "eval.mi_batch=256")
    assert rc == 2 and len(err) == 1 and "eval.mi_paths" in err[0], err

    # Overrides that would change the model are refused.
    rc, err = _eval_cli(capsys, "--run", tmp_path / "five", "--data", fmnist_small, "model.T=3")
    assert rc == 2 and len(err) == 1 and "eval.* overrides" in err[0], err


# ---------------------------------------------------------------- a trained run, 1 and 2 ranks
@pytest.fixture(scope="module")
def tiny_run(fmnist_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evalrun") / "run"
    rcn("train", "--preset", "tiny", "--data", fmnist_small, "--out", out, "--steps", "6",
        "train.eval_every=0", "train.ckpt_every=5")
    return out


@pytest.mark.slow
def test_eval_writes_every_metric_and_matches_the_loop(tiny_run, fmnist_small):
    p = rcn("eval", "--run", tiny_run, "--data", fmnist_small, "--reduced", "--iw", "3",
            "eval.nn_samples=64", "eval.classifier_steps=20", "eval.fd_samples=128", "eval.c2st_samples=64",
            "eval.mi_examples=64", "eval.mi_batch=32", "eval.mi_paths=4", "eval.copy_cells=2")
    assert "reduced" in p.stdout
    ev = json.loads((tiny_run / "eval.json").read_text())
    m = ev["metrics"]
    assert ev["reduced"] is True and ev["step"] == 6 and ev["eval"]["iw_samples"] == 3
    expected = ("test_error", "test_elbo", "test_recon", "test_kl", "test_margin", "iw_nll", "iw_elbo_mc",
                "nn_gen_median", "nn_test_median", "nn_ratio", "frechet", "frechet_ref",
                "classifier_test_accuracy", "caps_decoder_shuffle", "caps_decoder_zero", "caps_encoder_shuffle",
                "caps_encoder_zero", "caps_decoder_spread", "caps_decoder_length", "caps_encoder_spread",
                "caps_encoder_length", "info_rate", "mi_lower", "mi_upper", "copy_zu", "frechet_low",
                "frechet_high", "class_kl", "class_min_share", "c2st_accuracy", "c2st_low", "c2st_high",
                "c2st_control", "window_area")
    for k in expected:
        assert isinstance(m[k], float) and math.isfinite(m[k]), (k, m.get(k))
    for k, n in (("info_rate_steps", 4), ("info_active_units_steps", 4), ("window_area_steps", 4),
                 ("window_x_steps", 4), ("window_y_steps", 4), ("class_shares", 10), ("class_shares_test", 10)):
        assert isinstance(m[k], list) and len(m[k]) == n, (k, m.get(k))
    assert m["info_n"] == 512  # --reduced caps it at 2000 images; this test split has 512
    assert m["mi_n"] == 8 and m["c2st_n"] == 64 and m["frechet_n"] == 128 and m["window_samples"] == 128
    assert 0 <= m["info_active_units"] <= m["info_units"] == 32 and m["nn_train_images"] == 512
    assert m["memorised"] is False and m["iw_k"] == 3 and m["iw_n"] == 500 and m["test_n"] == 512
    assert m["caps_n"] == 512 and m["caps_decoder_spread"] > 0.1
    assert m["iw_nll"] <= m["iw_elbo_mc"]
    loop = metrics(tiny_run, "eval")[-1]
    assert loop["step"] == 6 and loop["full"]
    assert 0 <= loop["info_active_units"] <= 32 and 0 < loop["info_write_area"] <= 1  # the loop's first batch
    for k in ("test_elbo", "test_recon", "test_kl", "test_margin", "test_error"):
        assert m[k] == pytest.approx(loop[k], rel=1e-6, abs=1e-12), k
    assert (fmnist_small / "feature_classifier" / "model.safetensors").is_file()


@pytest.mark.slow
def test_eval_on_two_ranks_counts_every_image_once(tiny_run, fmnist_small, tmp_path):
    out = tmp_path / "eval2.json"
    run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "rcn_dist.cli", "eval", "--run-dir", tiny_run, "--data", fmnist_small, "--parts", "test,iw",
         "--iw", "2", "--out", out], env=cli_env())
    two = json.loads(out.read_text())
    m = two["metrics"]
    assert two["world_size"] == 2 and m["test_n"] == 512 and m["iw_n"] == 512
    loop = metrics(tiny_run, "eval")[-1]
    for k in ("test_elbo", "test_recon", "test_kl", "test_margin", "test_error"):
        assert m[k] == pytest.approx(loop[k], rel=1e-6, abs=1e-12), k
    # The IW noise depends on the image, not on the rank that reads it.
    one = tmp_path / "eval1.json"
    rcn("eval", "--run", tiny_run, "--data", fmnist_small, "--parts", "iw", "--iw", "2", "--out", one)
    assert m["iw_nll"] == pytest.approx(json.loads(one.read_text())["metrics"]["iw_nll"], rel=1e-9)
