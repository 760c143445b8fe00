"""`rcn eval`: a trained run as numbers (docs/evaluation.md says what each one is).

    rcn eval --run RUN_DIR [--data DIR] [--iw K] [--reduced] [--parts test,caps,iw,nn,fd] [eval.x=v ...]
    torchrun --nproc_per_node N -m rcn_dist.cli eval --run RUN_DIR ...

Writes RUN_DIR/eval.json (rank 0) and prints a table. On N ranks the test split is split by
rank (every test image counted once) and the sums are all-reduced; the sample-quality figures
(nn, fd) are computed on rank 0 alone. The test part is `rcn_dist.loop.evaluate`, the training
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

from rcn_dist import console
from rcn_dist.config import Config, ConfigError, apply_overrides
from rcn_dist.errors import CheckpointError, DataError
from rcn_dist.files import atomic_write
from rcn_dist.loop import EVAL_NOISE_SEED, LossModule, caps_input, evaluate, test_stream
from rcn_dist.model import bits_per_dim, sample_noise, step_noise_seed
from rcn_dist.model.losses import top_k_correct
from rcn_dist.parallel import collectives

PARTS = ("test", "caps", "iw", "nn", "fd")
REDUCED = {"iw_samples": 10, "iw_examples": 500, "caps_examples": 1000, "nn_samples": 128, "nn_train_images": 10000,
           "classifier_steps": 200}
"""`--reduced` caps these eval.* settings (explicit eval.* overrides still win): the quickstart's
evaluation, minutes on two CPU cores for the small preset."""
NN_SEED = 1234
"""Seed of the prior noise of the samples for the nearest-neighbour and Frechet figures."""

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
    "quality_samples": "prior samples behind the nearest-neighbour and Frechet figures",
    "nn_gen_median": "median L2 distance from a sample to its nearest training image",
    "nn_gen_mean": "mean of the same",
    "nn_gen_min": "smallest of the same (0: an exact copy)",
    "nn_test_median": "median L2 distance from a held-out test image to its nearest training image",
    "nn_test_mean": "mean of the same",
    "nn_ratio": "nn_gen_median / nn_test_median (about 1: as new as unseen data; << 1: copies)",
    "nn_copy_share": "share of samples closer to a training image than 0.1 x nn_test_median",
    "memorised": "flag: nn_ratio < 0.25 or nn_copy_share > 0.05",
    "nn_train_images": "training images searched",
    "frechet": "Frechet distance, samples vs test images, in FeatureNet's 64-d feature space",
    "frechet_ref": "the same, as many training images vs the test images (the floor)",
    "classifier_test_accuracy": "FeatureNet's accuracy on those test images (its features are meaningful)",
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
    log_px = -model.decoder.recon_nll(out.canvas[:, -1], x)
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
    from rcn_dist.model.usage import ablation_elbos, capsule_stats

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


# ---------------------------------------------------------------- sample quality (rank 0)
def _first_images(data_dir: str, split: str, n: int) -> tuple[Tensor, Tensor]:
    """The first n grey images (n, C, H, W) of a split and their labels, streamed."""
    from rcn_dist.data.loader import EvalStream

    imgs, labels = [], []
    for batch in EvalStream(data_dir, min(n, 256), 0, 1, split=split, binarize="none"):
        imgs.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
        if sum(map(len, imgs)) >= n:
            break
    return torch.cat(imgs)[:n], torch.cat(labels)[:n]


def sample_quality(model, cfg: Config, data_dir: str, run_dir: Path, device: str, parts: set[str],
                   progress: bool = False, pictures: Path | None = None) -> dict[str, Any]:
    """Nearest-neighbour and Frechet figures of eval.nn_samples prior samples (seed NN_SEED), and
    nearest.png (samples above their nearest training images) in `pictures` if given."""
    from rcn_dist import quality
    from rcn_dist.data.loader import EvalStream
    from rcn_dist.sample import generate, grid

    e = cfg.eval
    canvases, _ = generate(model, e.nn_samples, NN_SEED, device)
    gen = canvases[:, -1]  # (n, C, H, W) means of the final canvas
    test_x, test_y = _first_images(data_dir, "test", e.nn_samples)
    out: dict[str, Any] = {"quality_samples": len(gen)}
    if "nn" in parts:
        train = EvalStream(data_dir, 1024, 0, 1, split="train", binarize="none")  # grey (B, D), shard by shard
        batches = console.track((b["image"][b["mask"]].flatten(1) for b in train), "nearest neighbours",
                                enabled=progress)
        figs, nearest = quality.nearest_neighbours(gen.flatten(1), test_x.flatten(1), batches,
                                                   limit=e.nn_train_images)
        out |= figs
        if pictures is not None:
            pictures.mkdir(parents=True, exist_ok=True)
            k = min(16, len(gen))
            near = nearest[:k].float().view(k, *gen.shape[1:])
            grid(torch.cat([gen[:k], near]), ncol=k, scale=2).save(pictures / "nearest.png")
    if "fd" in parts:
        net = quality.feature_classifier(data_dir, run_dir / "eval_classifier", e.classifier_steps,
                                         seed=cfg.train.seed, progress=progress, device=device)
        train_x, _ = _first_images(data_dir, "train", e.nn_samples)
        f_gen, f_test, f_train = (quality.features(net, x) for x in (gen, test_x, train_x))
        with torch.no_grad():
            logits = torch.cat([net(test_x[i:i + 256].to(device)).cpu() for i in range(0, len(test_x), 256)])
        out |= {"frechet": quality.frechet_distance(f_gen, f_test),
                "frechet_ref": quality.frechet_distance(f_train, f_test),
                "classifier_test_accuracy": top_k_correct(logits, test_y).double().mean().item()}
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
    from rcn_dist.data.loader import Manifest
    from rcn_dist.parallel.checkpoint import load_model

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
    from rcn_dist.parallel.env import detect, init_process_group

    args = build_parser().parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        raise ConfigError(f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {args.parts!r}")
    # Only eval.* may be overridden: anything else would not describe the checkpoint.
    if bad := [o for o in args.overrides if not o.strip().startswith("eval.")]:
        raise ConfigError(f"rcn eval takes only eval.* overrides, got {bad[0]!r}")
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    le = detect()
    if le.world_size > 1:
        init_process_group(le)  # also binds this rank's GPU (le.device)
    elif le.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(le.device))
    cfg, model, where, data_dir, manifest = load_for_eval(args.run, args.data, le.device)
    if args.reduced:  # the caps first, so that --iw and eval.* overrides (applied next) win
        cfg.eval = dataclasses.replace(cfg.eval, **{
            k: (v if getattr(cfg.eval, k) == 0 else min(getattr(cfg.eval, k), v)) for k, v in REDUCED.items()})
    overrides = ([f"eval.iw_samples={args.iw}"] if args.iw is not None else []) + args.overrides
    cfg = apply_overrides(cfg, overrides) if overrides else cfg
    rank0 = le.rank == 0
    con = console.Console(rank0)
    e, t = cfg.eval, cfg.train
    con.info(f"evaluating {where} on {data_dir} ({le.world_size} rank(s), {le.device})"
             + (f"; reduced: IW K={e.iw_samples} on {e.iw_examples or 'all'} test images, "
                f"{e.nn_samples} samples vs {e.nn_train_images or 'all'} training images, "
                f"classifier {e.classifier_steps} steps" if args.reduced else ""))
    metrics: dict[str, Any] = {}
    stream = partial(test_stream, cfg, data_dir, t.micro_batch or t.batch_size, le.rank, le.world_size)
    if "test" in parts:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        test_model = copy.deepcopy(model).to(dtype) if dtype else model
        # Exactly the loop's call: the same stream, batch, noise and reduction.
        ev = evaluate(LossModule(test_model), stream(), cfg, le.device, progress=rank0)
        # The loop's caps_* ride-alongs come from one batch; eval.json's caps_* are the caps part's,
        # over eval.caps_examples images, and only when that part runs.
        metrics |= {k: v for k, v in ev.items() if not k.startswith("caps_")}
        if manifest.multi_label:
            metrics["two_object_accuracy"] = 1.0 - metrics["test_error"]
    if "caps" in parts:
        metrics |= capsule_usage(model, stream(), cfg, le.device, e.caps_examples, progress=rank0)
    if "iw" in parts:
        metrics |= importance_weighted(model, stream(), cfg, le.device, e.iw_samples, e.iw_examples, progress=rank0)
    if rank0 and parts & {"nn", "fd"}:
        is_run_dir = (Path(args.run) / "checkpoints").is_dir()  # not a checkpoint or export dir
        metrics |= sample_quality(model, cfg, data_dir, Path(args.run), le.device, parts, progress=True,
                                  pictures=Path(args.run) / "samples" if is_run_dir else None)
    if rank0:
        report = {"run": str(args.run), "checkpoint": str(where), "step": _checkpoint_step(where),
                  "data": str(data_dir), "dataset": manifest.dataset, "world_size": le.world_size,
                  "precision": t.precision, "reduced": bool(args.reduced), "parts": sorted(parts),
                  "eval": dataclasses.asdict(e), "metrics": metrics}
        out = Path(args.out) if args.out else Path(args.run) / "eval.json"
        atomic_write(out, json.dumps(report, indent=1, sort_keys=True) + "\n")
        con.table(f"eval {where.name}" + (" (reduced)" if args.reduced else ""), metrics)
        con.info(f"wrote {out}")
    if le.world_size > 1:
        collectives.destroy()
    return 0


