"""`rcn eval`: a trained run as numbers (docs/evaluation.md says what each one is).

    rcn eval --run RUN_DIR [--data DIR] [--iw K] [--reduced] [--parts test,caps,iw,info,nn,fd,c2st,window]
             [eval.x=v ...]
    torchrun --nproc_per_node N -m rcn_dist.cli eval --run RUN_DIR ...

Writes RUN_DIR/eval.json (rank 0) and prints a table. On N ranks the test split is split by
rank (every test image counted once) and the sums are all-reduced; the sample-quality figures
(nn, fd, c2st, window) are computed on rank 0 alone. The test part is `rcn_dist.evaluation.evaluate`, the training
loop's own function with the same noise, in the run's training precision; the other parts run
in fp32.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rcn_dist import console, quality
from rcn_dist.config import Config, ConfigError, apply_overrides
from rcn_dist.data.loader import EvalStream, Manifest
from rcn_dist.errors import CheckpointError, DataError
from rcn_dist.evaluation import EVAL_NOISE_SEED, caps_input, eval_stream, evaluate
from rcn_dist.files import atomic_write
from rcn_dist.information import information_figures, mutual_information_terms, posterior_sums
from rcn_dist.model import bits_per_dim, sample_noise, step_noise_seed
from rcn_dist.model.losses import LossModule
from rcn_dist.model.usage import ablation_elbos, capsule_stats
from rcn_dist.parallel import collectives
from rcn_dist.parallel.checkpoint import load_model
from rcn_dist.parallel.env import detect, init_process_group
from rcn_dist.sample import grid, window_figures

PARTS = ("test", "caps", "iw", "info", "nn", "fd", "c2st", "window")
SAMPLE_PARTS = {"nn", "fd", "c2st", "window"}
"""The parts computed from prior samples, on rank 0."""
REDUCED = {"iw_samples": 10, "iw_examples": 500, "caps_examples": 1000, "info_examples": 2000, "mi_examples": 2048,
           "nn_samples": 500, "nn_train_images": 0, "fd_samples": 5000, "fd_bootstrap": 50, "c2st_samples": 1000}
"""`--reduced` caps these eval.* settings (0: all; explicit eval.* overrides still win): the
quickstart's evaluation, a few minutes on two CPU cores for the small preset. The nearest
neighbours still search the whole training split and the Frechet distance still takes 5,000
samples; the feature classifier is the data set's own, never a reduced one."""
NN_SEED = 1234
"""Seed of the prior noise of the samples behind the sample-quality figures."""
DRAW_SEED = 4321
"""Seed of the draws from the decoder's likelihood (the samples as images like the data)."""
RIDE_ALONG = ("caps_", "info_")
"""Prefixes of the training loop's one-batch figures (rcn_dist.evaluation.evaluate): `rcn eval`'s own
parts replace them with figures over many images."""

METRICS = {
    "test_error": "test classification error from class-capsule lengths (MultiMNIST: both top-2 must be right)",
    "two_object_accuracy": "MultiMNIST: share of test images whose 2 longest capsules are exactly their 2 classes",
    "test_elbo": "negative ELBO = recon + KL (analytic), nats per image: the training loop's figure",
    "test_bits_per_dim": "test_elbo in bits per sub-pixel (logistic likelihood)",
    "test_recon": "-log D(x | c_T), nats",
    "test_kl": "sum over steps of KL(q(z_t | x) || N(0, I)), nats",
    "test_margin": "margin loss of the class capsules",
    "test_n": "test images evaluated",
    "caps_n": "test images behind the capsule figures",
    "caps_decoder_shuffle": "increase in test negative ELBO, nats, when the decoder capsules' outputs are shuffled across images",
    "caps_decoder_zero": "the same when they are zeroed",
    "caps_encoder_shuffle": "increase in test negative ELBO, nats, when the class capsules are shuffled across images",
    "caps_encoder_zero": "the same when they are zeroed",
    "caps_decoder_spread": "rms |o - mean o| / rms |o| of the decoder capsule outputs across images (0: a constant)",
    "caps_decoder_length": "mean length of the decoder's routed capsules (near 1: squash saturated)",
    "caps_decoder_primary_length": "mean length of the decoder's primary capsules",
    "caps_encoder_spread": "the same spread for the class capsules",
    "caps_encoder_length": "mean length of the class capsules",
    "caps_encoder_primary_length": "mean length of the encoder's primary capsules",
    "iw_nll": "importance-weighted bound -log mean_k w_k (K = iw_k), nats: >= -log p(x), <= iw_elbo_mc",
    "iw_bits_per_dim": "iw_nll in bits per sub-pixel",
    "iw_elbo_mc": "mean over the same K samples of the one-sample negative ELBO -log w_k, nats",
    "iw_n": "test images in the IW bound",
    "iw_k": "importance samples per image",
    "info_rate": "sum over steps of info_rate_steps: test_kl of these images, nats",
    "info_rate_steps": "rate per step: mean KL(q(z_t | x, z_<t) || N(0, I)), nats, t = 1..T",
    "info_active_units": "latent units (of T x z_dim) with Var_x E_q[z_t,d | x] > 0.01 (Burda et al. 2016)",
    "info_active_units_steps": "the same per step (of z_dim each)",
    "info_units": "T x z_dim, the most there can be",
    "info_n": "test images behind the rate and active units (two posterior paths each)",
    "mi_lower": "I_q(x; z) lower bound: minibatch aggregate posterior, own posterior included (<= log mi_batch), nats",
    "mi_upper": "I_q(x; z) upper bound: the same, leave-one-out mixture, nats",
    "mi_batch": "posteriors per mixture (eval.mi_batch)",
    "mi_log_batch": "log mi_batch, the most mi_lower can reach",
    "mi_n": "posterior paths behind the MI estimates (eval.mi_paths per mixture)",
    "quality_samples": "prior samples generated for the sample-quality figures",
    "nn_gen_median": "median L2 distance from a sample to its nearest training image",
    "nn_gen_mean": "mean of the same",
    "nn_gen_min": "smallest of the same (0: an exact copy)",
    "nn_test_median": "median L2 distance from a held-out test image to its nearest training image",
    "nn_test_mean": "mean of the same",
    "nn_ratio": "nn_gen_median / nn_test_median (about 1: as new as unseen data; << 1: copies)",
    "nn_copy_share": "share of samples closer to a training image than 0.1 x nn_test_median",
    "memorised": "flag: nn_ratio < 0.25 or nn_copy_share > 0.05",
    "nn_train_images": "training images searched",
    "copy_zu": "data-copying C_T (Meehan et al. 2020): weighted mean over cells of Z_U; << 0 (< -3): copies, ~0: as new as unseen data",
    "copy_zu_min": "the lowest cell's Z_U",
    "copy_cells_used": "k-means cells with enough samples to count (of copy_cells)",
    "copy_cells": "k-means cells on the training set",
    "copy_zu_cells": "Z_U per cell (null: too few samples there)",
    "frechet": "Frechet distance, samples vs test images, in FeatureNet's 128-d feature space",
    "frechet_low": "its 95% bootstrap interval, lower end",
    "frechet_high": "its 95% bootstrap interval, upper end",
    "frechet_ref": "the same, as many training images vs the test images (the floor)",
    "frechet_n": "samples (and test images) behind the Frechet distance",
    "classifier_test_accuracy": "FeatureNet's accuracy on the whole test split (its features are meaningful)",
    "classifier_val_accuracy": "the same on the validation split",
    "class_kl": "KL(samples' class shares || test images' class shares), by FeatureNet, nats",
    "class_min_share": "the rarest class's share of the samples (1 / classes when balanced)",
    "class_rarest": "the rarest class",
    "class_shares": "the samples' class shares",
    "class_shares_test": "the test images' class shares",
    "class_names": "the classes",
    "c2st_accuracy": "two-sample test: held-out accuracy telling samples from test images (0.5: indistinguishable)",
    "c2st_low": "its 95% Wilson interval, lower end",
    "c2st_high": "its 95% Wilson interval, upper end",
    "c2st_control": "the same test of test images against other test images (about 0.5)",
    "c2st_control_low": "its interval, lower end",
    "c2st_control_high": "its interval, upper end",
    "c2st_n": "held-out images per test (half samples, half real)",
    "window_area": "write window's share of the image, mean over steps and samples",
    "window_area_steps": "the same per step",
    "window_x_steps": "mean write-window centre per step, pixels from the left edge",
    "window_y_steps": "the same, pixels from the top edge",
    "window_samples": "prior samples behind the window figures",
}
"""What each number in eval.json means (the report's third column)."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rcn eval", description="Evaluate a trained run.")
    ap.add_argument("--run", "--run-dir", dest="run", required=True,
                    help="run directory (its latest checkpoint), or a checkpoint dir (--run-dir under torchrun, "
                    "whose own --run-path option swallows --run)")
    ap.add_argument("--data", help="prepared data directory (default: the run's data.dir)")
    ap.add_argument("--iw", type=int, metavar="K", help="importance samples K (overrides eval.iw_samples)")
    ap.add_argument("--reduced", action="store_true",
                    help="reduced evaluation: " + ", ".join(f"eval.{k}<={v}" for k, v in REDUCED.items()))
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", help="where to write the JSON (default RUN_DIR/eval.json)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    ap.add_argument("overrides", nargs="*", help="eval.field=value, e.g. eval.iw_samples=100")
    return ap


# ---------------------------------------------------------------- importance-weighted bound
def log_weights(model, x: Tensor, eps: Tensor, x_caps: Tensor | None = None) -> Tensor:
    """log w = log p(x | z) + log p(z) - log q(z | x) per image (B,), for the whole z_{1:T}.

    z_t = mu_t + sigma_t eps_t (the encoder's reparameterisation), so per dimension
    log q = -(log 2 pi + logvar + eps^2) / 2 and log p = -(log 2 pi + z^2) / 2; the 2 pi cancel.
    x (B, C, H, W); eps (B, T, z_dim); x_caps: what the encoder capsules see (RCN.forward).
    """
    out = model(x, eps, x_caps)
    log_px = -model.decoder.recon_nll(out.last_canvas, x)
    z = out.mu + torch.exp(0.5 * out.logvar) * eps
    return log_px + 0.5 * (eps.pow(2) + out.logvar - z.pow(2)).flatten(1).sum(1)


def _kept(stream, examples: int, label: str, progress: bool, least: int = 1):
    """(batch, keep) for each batch with at least `least` images that count: not padding, and
    split index < `examples` (0: all)."""
    for batch in console.track(stream, label, enabled=progress):
        keep = batch["mask"] & ((batch["index"] < examples) if examples else True)
        if int(keep.sum()) >= least:
            yield batch, keep


@torch.no_grad()
def importance_weighted(model, stream, cfg: Config, device: str, k: int, examples: int = 0,
                        progress: bool = False) -> dict[str, float]:
    """The K-sample importance-weighted bound, -log mean_k w_k, averaged over test images.

    Only images with split index < `examples` count (0: all). Sample k's noise is drawn from
    (train.seed + EVAL_NOISE_SEED, k, image index), sample 0 being exactly the evaluation noise.
    Returns iw_nll (the bound, nats, an upper bound on -log p(x) no looser than the ELBO),
    iw_elbo_mc (the mean single-sample negative ELBO -log w_k of the same K samples: equal to
    iw_nll when K = 1, never below it), iw_n and iw_k; all-reduced over ranks.
    """
    base = cfg.train.seed + EVAL_NOISE_SEED
    seeds = [base if j == 0 else step_noise_seed(base, j) for j in range(k)]
    m = cfg.model
    sums = torch.zeros(3, dtype=torch.float64)  # sum of -bound, sum of mean -log w, images
    for batch, keep in _kept(stream, examples, f"IW bound (K={k})", progress):
        x, idx = batch["image"][keep].to(device), batch["index"][keep]
        x_caps = caps_input(batch, cfg, device, keep)
        lw = torch.stack([log_weights(model, x, sample_noise(idx, seed, m.T, m.z_dim, device=device), x_caps)
                          .double().cpu() for seed in seeds])  # (K, B)
        bound = torch.logsumexp(lw, dim=0) - math.log(k)
        sums += torch.stack([-bound.sum(), -lw.mean(0).sum(), torch.tensor(float(len(idx)), dtype=torch.float64)])
    sums = collectives.all_reduce(sums)
    n = max(sums[2].item(), 1.0)
    out = {"iw_nll": sums[0].item() / n, "iw_elbo_mc": sums[1].item() / n, "iw_n": int(sums[2].item()), "iw_k": k}
    if m.likelihood == "logistic":
        out["iw_bits_per_dim"] = bits_per_dim(out["iw_nll"], m.in_channels * m.height * m.width)
    return out


# ---------------------------------------------------------------- capsule usage
@torch.no_grad()
def capsule_usage(model, stream, cfg: Config, device: str, examples: int = 0,
                  progress: bool = False) -> dict[str, float]:
    """How much the capsule networks carry: ELBO increases under ablation, spread and lengths.

    Only images with split index < `examples` count (0: all); the noise is the evaluation noise,
    so "caps_*" increases are against exactly the `test_elbo` images' terms. Every figure is a
    mean over images (the statistics: over batches, weighted by their images), all-reduced.
    """
    m = cfg.model
    names: list[str] = []
    sums: Tensor | None = None
    for batch, keep in _kept(stream, examples, "capsule usage", progress, least=2):  # a shuffle needs two
        x, y, idx = batch["image"][keep].to(device), batch["label"][keep].to(device), batch["index"][keep]
        x_caps = caps_input(batch, cfg, device, keep)
        eps = sample_noise(idx, cfg.train.seed + EVAL_NOISE_SEED, m.T, m.z_dim, device=device)
        elbos = ablation_elbos(model, x, y, eps, x_caps)
        figs = {k: (v - elbos["none"]).double().sum().item() for k, v in elbos.items() if k != "none"}
        figs |= {k: v * len(idx) for k, v in capsule_stats(model, x, eps, x_caps).items()}
        names = sorted(figs)
        row = torch.tensor([figs[k] for k in names] + [float(len(idx))], dtype=torch.float64)
        sums = row if sums is None else sums + row
    if sums is None:
        raise ConfigError("capsule usage needs at least two test images in one batch")
    sums = collectives.all_reduce(sums)
    n = sums[-1].item()
    return {f"caps_{k}": sums[i].item() / n for i, k in enumerate(names)} | {"caps_n": int(n)}


# ---------------------------------------------------------------- information (rank-split, all-reduced)
@torch.no_grad()
def information(model, stream, cfg: Config, device: str, examples: int = 0, mi_examples: int = 0,
                mi_batch: int = 2048, mi_paths: int = 128, progress: bool = False) -> dict[str, Any]:
    """The rate per step and the active units over the test images with split index < `examples`
    (0: all), two posterior paths each (the evaluation noise and IW sample 1's), and the two
    I_q(x; z) estimates of rcn_dist.information over mixtures of `mi_batch` images with index <
    `mi_examples` (0: all), the first `mi_paths` of each mixture giving a path (the evaluation
    noise's). A rank forms its mixtures from its own share of the test split and drops a last,
    incomplete one; a rank whose share holds no whole mixture is an error. All-reduced."""
    m = cfg.model
    base = cfg.train.seed + EVAL_NOISE_SEED
    shapes = {"kl": (m.T,), "m": (m.T, m.z_dim), "m2": (m.T, m.z_dim), "n": (), "w": (m.T, m.z_dim)}
    sums = {k: torch.zeros(shape, dtype=torch.float64) for k, shape in shapes.items()}
    mi = torch.zeros(3, dtype=torch.float64)  # sum of lower, sum of upper, paths
    pending: list[tuple[Tensor, Tensor | None, Tensor]] = []  # (x, x_caps, index) waiting for a mixture
    limit = max(examples, mi_examples) if examples and mi_examples else 0
    for batch, keep in _kept(stream, limit, "information", progress):
        x, idx = batch["image"][keep].to(device), batch["index"][keep]
        x_caps = caps_input(batch, cfg, device, keep)
        info = (idx < examples) if examples else torch.ones_like(idx, dtype=torch.bool)
        if info.any():
            sel = info.to(device)
            eps = tuple(sample_noise(idx[info], s, m.T, m.z_dim, device=device) for s in (base, step_noise_seed(base, 1)))
            part = posterior_sums(model, x[sel], eps, None if x_caps is None else x_caps[sel])
            sums = {k: sums[k] + v for k, v in part.items()}
        take = (idx < mi_examples) if mi_examples else torch.ones_like(idx, dtype=torch.bool)
        if take.any():
            sel = take.to(device)
            pending.append((x[sel], None if x_caps is None else x_caps[sel], idx[take]))
        while sum(len(p[2]) for p in pending) >= mi_batch:
            xs, cs, ids = (None if v[0] is None else torch.cat(v) for v in zip(*pending))
            pending = [(xs[mi_batch:], None if cs is None else cs[mi_batch:], ids[mi_batch:])]
            eps = sample_noise(ids[:mi_paths], base, m.T, m.z_dim, device=device)  # (mi_paths, T, z)
            lower, upper = mutual_information_terms(model, xs[:mi_batch], eps, None if cs is None else cs[:mi_batch])
            mi += torch.stack([lower.sum(), upper.sum(), torch.tensor(float(len(lower)), dtype=torch.float64)])
    names = sorted(shapes)
    total = collectives.all_reduce(torch.cat([sums[k].reshape(-1) for k in names] + [mi]))  # one all-reduce
    at = 0
    for k in names:
        size = math.prod(shapes[k])
        sums[k], at = total[at:at + size].view(shapes[k]), at + size
    out: dict[str, Any] = {}
    if sums["n"].item() > 0:
        out |= information_figures(sums)
    lower, upper, n_mi = total[at:].tolist()
    if n_mi == 0:  # the same sum on every rank: each one stops with this line
        raise DataError(f"the I_q(x; z) estimate needs a mixture of eval.mi_batch={mi_batch} test images on one "
                        f"rank at least; eval.mi_examples={mi_examples} (0: all) leaves fewer: lower eval.mi_batch "
                        "or raise eval.mi_examples")
    out |= {"mi_lower": lower / n_mi, "mi_upper": upper / n_mi, "mi_log_batch": math.log(mi_batch),
            "mi_batch": mi_batch, "mi_n": int(n_mi)}
    return out


# ---------------------------------------------------------------- sample quality (rank 0)
def _first_images(data_dir: str, split: str, n: int, binarize: str = "none") -> tuple[Tensor, Tensor]:
    """The first n images (n, C, H, W) of a split and their labels, streamed: grey, or binarised
    as the test stream binarises (binarize, seed 0)."""
    imgs, labels = [], []
    for batch in EvalStream(data_dir, min(max(n, 1), 512), 0, 1, split=split, binarize=binarize):
        imgs.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
        if sum(map(len, imgs)) >= n:
            break
    return torch.cat(imgs)[:n], torch.cat(labels)[:n]


@torch.no_grad()
def prior_samples(model, n: int, seed: int, device: str, batch: int = 256) -> tuple[Tensor, dict[str, Tensor] | None]:
    """n samples from the prior: the decoder's means of the final canvas (n, C, H, W) on the CPU,
    and the write windows (cx, cy, delta, ... each (n, T)) or None. Sample i's noise depends only
    on (seed, i) (model.sample_noise), so the first k of n samples are the k samples."""
    c = model.cfg
    finals, wins = [], []
    for i in range(0, n, batch):
        eps = sample_noise(torch.arange(i, min(i + batch, n)), seed, c.T, c.z_dim)
        canv, win = model.generate(len(eps), eps.to(device), device=device)
        finals.append(canv[:, -1].float().cpu())  # only the final canvas: T of them would not fit
        wins.append(None if win is None else {k: v.float().cpu() for k, v in win.items()})
    return torch.cat(finals), (None if wins[0] is None else {k: torch.cat([w[k] for w in wins]) for k in wins[0]})


def draw_like_data(model, means: Tensor, cfg: Config, seed: int = DRAW_SEED) -> Tensor:
    """The samples as images like the data the model was trained on: a Bernoulli draw from the
    means where the data are binarised, a draw from the discretised logistic (mean sigmoid(c_T),
    the decoder's scale, quantised to 1/255) for the logistic likelihood, else the means."""
    g = torch.Generator().manual_seed(seed)
    if cfg.data.binarize != "none":
        return torch.bernoulli(means.clamp(0, 1), generator=g)
    log_scale = getattr(getattr(model, "decoder", None), "log_scale", None)
    if cfg.model.likelihood != "logistic" or log_scale is None:
        return means
    u = torch.rand(means.shape, generator=g, dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
    s = log_scale.detach().double().cpu().exp().view(1, -1, 1, 1)
    x = means.double() + s * (u.log() - (-u).log1p())
    return (torch.round(x.clamp(0, 1) * 255) / 255).float()


def _train_batches(data_dir: str, progress: bool):
    train = EvalStream(data_dir, 1024, 0, 1, split="train", binarize="none")  # grey (B, D), shard by shard
    return console.track((b["image"][b["mask"]].flatten(1) for b in train), "nearest neighbours", enabled=progress)


def sample_quality(model, cfg: Config, data_dir: str, run_dir: Path, device: str, parts: set[str],
                   progress: bool = False, pictures: Path | None = None) -> dict[str, Any]:
    """The sample-quality figures of prior samples (seed NN_SEED) for `parts` (docs/evaluation.md):

    - nn: nearest training images of eval.nn_samples samples and as many test images over the
      training split, and the data-copying test on the samples drawn like the data against test
      images binarised as the test stream does; nearest.png in `pictures` if given;
    - fd: the data set's feature classifier (cached), the Frechet distance of eval.fd_samples
      samples with its bootstrap interval, and the class histogram;
    - c2st: the classifier two-sample test of eval.c2st_samples samples drawn like the data
      against as many test images binarised alike, and its real-against-real control;
    - window: the write window's area and centre per step over eval.fd_samples samples.
    """
    e, m = cfg.eval, cfg.model
    manifest = Manifest.load(data_dir)
    n_test = manifest.num_samples("test")
    c2st_n = min(e.c2st_samples, n_test // 2)
    need = max([e.nn_samples] * ("nn" in parts) + [e.fd_samples] * bool(parts & {"fd", "window"})
               + [c2st_n] * ("c2st" in parts) + [1])
    gen, windows = prior_samples(model, need, NN_SEED, device)  # (need, C, H, W) decoder means
    drawn = draw_like_data(model, gen, cfg) if parts & {"nn", "c2st"} else None
    out: dict[str, Any] = {"quality_samples": len(gen)}
    if "window" in parts and windows is not None:
        k = min(e.fd_samples, len(gen))
        out |= window_figures({key: v[:k] for key, v in windows.items()}, m.write_n, m.height, m.width)
    if "nn" in parts:
        n = min(e.nn_samples, n_test)
        test_x, _ = _first_images(data_dir, "test", n)
        test_b, _ = _first_images(data_dir, "test", n, cfg.data.binarize)
        fit, _ = _first_images(data_dir, "train", min(quality.KMEANS_FIT_IMAGES, e.nn_train_images or 1 << 62))
        centroids = quality.kmeans(fit.flatten(1), e.copy_cells, seed=NN_SEED)
        queries = torch.cat([gen[:n], test_x, drawn[:n], test_b]).flatten(1)  # (4n, D)
        found = quality.search_training_set(queries, _train_batches(data_dir, progress), e.nn_train_images,
                                            centroids)
        dist, cells, in_cell = found["dist"], found["cells"], found["cell_dist"]
        out |= quality.nearest_neighbour_figures(dist[:n], dist[n:2 * n], found["seen"])
        out |= quality.data_copying(in_cell[2 * n:3 * n], cells[2 * n:3 * n], in_cell[3 * n:], cells[3 * n:],
                                    e.copy_cells)
        if pictures is not None:
            pictures.mkdir(parents=True, exist_ok=True)
            k = min(16, n)
            near = found["nearest"][:k].float().view(k, *gen.shape[1:])
            grid(torch.cat([gen[:k], near]), ncol=k, scale=2).save(pictures / "nearest.png")
    if "fd" in parts:
        net, known = quality.feature_classifier(data_dir, quality.classifier_dir(data_dir, run_dir),
                                                e.classifier_steps, progress=progress, device=device)
        n = min(e.fd_samples, n_test, manifest.num_samples("train"))
        test_x, _ = _first_images(data_dir, "test", n)
        train_x, _ = _first_images(data_dir, "train", n)
        f_gen, f_test, f_train = (quality.features(net, x) for x in (gen[:n], test_x, train_x))
        out |= {"frechet": quality.frechet_distance(f_gen, f_test),
                "frechet_ref": quality.frechet_distance(f_train, f_test), "frechet_n": n,
                "classifier_test_accuracy": known["test_accuracy"]}
        if "val_accuracy" in known:
            out["classifier_val_accuracy"] = known["val_accuracy"]
        if e.fd_bootstrap:
            out["frechet_low"], out["frechet_high"] = quality.frechet_interval(f_gen, f_test, e.fd_bootstrap,
                                                                               seed=NN_SEED)
        if not manifest.multi_label:  # one class per image: a histogram of argmax classes
            out |= quality.class_histogram(quality.logits_of(net, gen[:n]), quality.logits_of(net, test_x),
                                           manifest.class_names)
    if "c2st" in parts:
        real, _ = _first_images(data_dir, "test", 2 * c2st_n, cfg.data.binarize)
        main = quality.two_sample_test(drawn[:c2st_n], real[:c2st_n], seed=NN_SEED, device=device)
        control = quality.two_sample_test(real[c2st_n:], real[:c2st_n], seed=NN_SEED, device=device)
        out |= {"c2st_accuracy": main["acc"], "c2st_low": main["acc_low"], "c2st_high": main["acc_high"],
                "c2st_control": control["acc"], "c2st_control_low": control["acc_low"],
                "c2st_control_high": control["acc_high"], "c2st_n": main["n"]}
    return out


# ---------------------------------------------------------------- the command
def _checkpoint_step(where: Path) -> int | None:
    try:
        return int(json.loads((where / "COMPLETE").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_for_eval(run: str, data: str | None, device: str):
    """(cfg, fp32 model, checkpoint dir, data dir, manifest): checkpoint.load_model, then one clear
    error for data that does not fit the model."""
    run_path = Path(run)
    if not run_path.is_dir():
        raise CheckpointError(f"{run_path}: no such run directory")
    cfg, model, where = load_model(run_path, device)  # also refuses another model config's checkpoint
    data_dir = data or cfg.data.dir
    try:
        manifest = Manifest.load(data_dir)
    except DataError as e:
        raise DataError(f"{e}{'' if data else ' (pass --data DIR)'}") from None
    m = cfg.model
    if manifest.image_shape != (m.in_channels, m.height, m.width) or manifest.n_classes != m.n_classes:
        c, h, w = manifest.image_shape
        raise ConfigError(f"data {data_dir} holds {c}x{h}x{w} images of {manifest.n_classes} classes; the "
                          f"checkpoint's model takes {m.in_channels}x{m.height}x{m.width} and {m.n_classes}")
    return cfg, model, where, data_dir, manifest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        raise ConfigError(f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {args.parts!r}")
    # Only eval.* may be overridden: anything else would not describe the checkpoint.
    if bad := [o for o in args.overrides if not o.strip().startswith("eval.")]:
        raise ConfigError(f"rcn eval takes only eval.* overrides, got {bad[0]!r}")
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    launch = detect()
    if launch.world_size > 1:
        init_process_group(launch)  # also binds this rank's GPU (launch.device)
    elif launch.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(launch.device))
    cfg, model, where, data_dir, manifest = load_for_eval(args.run, args.data, launch.device)
    if args.reduced:  # the caps first, so that --iw and eval.* overrides (applied next) win
        cfg.eval = dataclasses.replace(cfg.eval, **{
            k: (v if getattr(cfg.eval, k) == 0 else min(getattr(cfg.eval, k), v)) for k, v in REDUCED.items()})
    overrides = ([f"eval.iw_samples={args.iw}"] if args.iw is not None else []) + args.overrides
    cfg = apply_overrides(cfg, overrides) if overrides else cfg
    rank0 = launch.rank == 0
    con = console.Console(rank0)
    e, t = cfg.eval, cfg.train
    con.info(f"evaluating {where} on {data_dir} ({launch.world_size} rank(s), {launch.device})"
             + (f"; reduced: IW K={e.iw_samples} on {e.iw_examples or 'all'} test images, "
                f"information on {e.info_examples or 'all'} (MI on {e.mi_examples or 'all'}), "
                f"{e.nn_samples} samples vs {e.nn_train_images or 'all'} training images, "
                f"Frechet on {e.fd_samples}, two-sample test on {e.c2st_samples}" if args.reduced else ""))
    metrics: dict[str, Any] = {}
    stream = partial(eval_stream, cfg, data_dir, t.micro_batch or t.batch_size, launch.rank, launch.world_size)
    if "test" in parts:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        test_model = copy.deepcopy(model).to(dtype) if dtype else model
        # Exactly the loop's call: the same stream, batch, noise and reduction.
        ev = evaluate(LossModule(test_model), stream(), cfg, launch.device, progress=rank0)
        # The loop's caps_* and info_* ride-alongs come from one batch; eval.json's are the caps and
        # info parts', over eval.caps_examples and eval.info_examples images, when those parts run.
        metrics |= {k: v for k, v in ev.items() if not k.startswith(RIDE_ALONG)}
        if manifest.multi_label:
            metrics["two_object_accuracy"] = 1.0 - metrics["test_error"]
    if "caps" in parts:
        metrics |= capsule_usage(model, stream(), cfg, launch.device, e.caps_examples, progress=rank0)
    if "iw" in parts:
        metrics |= importance_weighted(model, stream(), cfg, launch.device, e.iw_samples, e.iw_examples, progress=rank0)
    if "info" in parts:
        metrics |= information(model, stream(), cfg, launch.device, e.info_examples, e.mi_examples, e.mi_batch,
                               e.mi_paths, progress=rank0)
    if rank0 and parts & SAMPLE_PARTS:
        is_run_dir = (Path(args.run) / "checkpoints").is_dir()  # not a checkpoint or export dir
        metrics |= sample_quality(model, cfg, data_dir, Path(args.run), launch.device, parts, progress=True,
                                  pictures=Path(args.run) / "samples" if is_run_dir else None)
    if rank0:
        report = {"run": str(args.run), "checkpoint": str(where), "step": _checkpoint_step(where),
                  "data": str(data_dir), "dataset": manifest.dataset, "world_size": launch.world_size,
                  "precision": t.precision, "reduced": bool(args.reduced), "parts": sorted(parts),
                  "eval": dataclasses.asdict(e), "metrics": metrics}
        out = Path(args.out) if args.out else Path(args.run) / "eval.json"
        atomic_write(out, json.dumps(report, indent=1, sort_keys=True) + "\n")
        # Per-step and per-class lists are in eval.json and the report; the table shows the numbers.
        con.table(f"eval {where.name}" + (" (reduced)" if args.reduced else ""),
                  {k: v for k, v in metrics.items() if not isinstance(v, list)})
        con.info(f"wrote {out}")
    if launch.world_size > 1:
        collectives.destroy()
    return 0


