"""Evaluation, for every layout and for `rcn eval`: the test (or validation) metrics of a model.

`evaluate` runs anything that meets `Evaluable` (a `LossModule`, a layout's adapter around its
DeepSpeed engine, a pipeline rank) over an evaluation stream (`eval_stream`, `periodic_stream`)
and sums the per-sample terms over every rank. `caps_input` and `to_device` are the batch helpers
every layout's step uses too. Nothing here names a layout.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from rcn_dist import console
from rcn_dist.config import Config
from rcn_dist.data.loader import EvalStream, Manifest
from rcn_dist.information import batch_information
from rcn_dist.model import bits_per_dim, noise_for, step_noise_seed
from rcn_dist.model.usage import capsule_stats
from rcn_dist.parallel import collectives

EVAL_NOISE_SEED = 2**31 - 1  # offset of the eval noise stream from the training one


class Evaluable(Protocol):
    """What `evaluate` needs of the model a layout holds on this rank."""

    rcn: nn.Module | None
    """The whole RCN where this rank holds it (the capsule and information figures of the first
    batch ride along), else None (a pipeline stage)."""
    training: bool
    """Whether the model is in training mode (restored after the evaluation)."""

    def train(self, mode: bool = True) -> Any:
        """Training (True) or evaluation (False) mode, as nn.Module.train."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                 x_caps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Forward without gradients: the per-sample terms (B,) ("correct", "elbo", "recon", "kl",
        "margin", ...), zeros on a rank whose samples `evaluate` sees masked out."""


def caps_input(batch: dict[str, torch.Tensor], cfg: Config, device: str | torch.device,
               keep: torch.Tensor | None = None) -> torch.Tensor | None:
    """What the encoder capsules see for this batch (data.caps_input): the grey image (only the
    rows `keep` selects, where given), or None (the binarised image itself)."""
    if cfg.data.caps_input != "grey" or "grey" not in batch:
        return None
    grey = batch["grey"] if keep is None else batch["grey"][keep.cpu()]
    return to_device(grey, device)


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A loader tensor on the rank's device. On a GPU the copy does not block the host: the
    training loader pins its batches (TrainStream pin_memory), so the copy overlaps the step;
    an unpinned tensor is copied synchronously as before."""
    return t.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: Evaluable, stream, cfg: Config, device: str, max_batches: int = 0,
             progress: bool = False) -> dict[str, float]:
    """Metrics of the stream's split ("test_*", or "val_*" on the validation split) summed over
    the valid (unpadded) samples of every rank.

    The same noise (seeded by train.seed and the sample index) is used for every evaluation of a
    checkpoint, so the loop's test ELBO and `rcn eval`'s are the same number. Where the whole
    model is on this rank, the capsule statistics of the first batch ride along ("caps_*":
    spread across images and lengths, rcn_dist/model/usage.py), so that capsules that stop
    carrying the image show while the run trains, and so do the first batch's active units and
    write-window area ("info_*", rcn_dist.information.batch_information: two more forward passes
    of that batch).
    """
    was_training = model.training
    model.train(False)
    keys = ("correct", "elbo", "recon", "kl", "margin")
    # The sums stay on the device until the one all-reduce at the end: no host sync per batch.
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=device)
    caps: dict[str, float] = {}
    for n_batches, batch in enumerate(console.track(stream, "eval", enabled=progress), 1):
        x, y = to_device(batch["image"], device), to_device(batch["label"], device)
        eps = noise_for(batch, cfg.train.seed + EVAL_NOISE_SEED, cfg, device=device)
        x_caps = caps_input(batch, cfg, device)
        terms = model(x, y, eps, x_caps=x_caps)
        rcn = model.rcn
        if not caps and rcn is not None and int(batch["mask"].sum()) > 1:
            keep = batch["mask"].to(device)
            xc = None if x_caps is None else x_caps[keep]
            caps = {f"caps_{k}": v for k, v in capsule_stats(rcn, x[keep], eps[keep], xc).items()}
            # A second posterior path per image (IW sample 1's noise) for the active units.
            eps2 = noise_for(batch, step_noise_seed(cfg.train.seed + EVAL_NOISE_SEED, 1), cfg, device=device)
            caps |= batch_information(rcn, x[keep], (eps[keep], eps2[keep]), xc)
        mask = to_device(batch["mask"], device).double()
        sums += torch.stack([(terms[k].double() * mask).sum() for k in keys] + [mask.sum()])
        if max_batches and n_batches >= max_batches:
            break
    sums = collectives.all_reduce(sums).tolist()
    model.train(was_training)
    n = max(sums[-1], 1.0)
    split = "val" if getattr(stream, "split", "test") == "val" else "test"
    out = {f"{split}_{k}": sums[i] / n for i, k in enumerate(keys) if k != "correct"}
    # No classifier (model.enc_capsules=False): the error is undefined, not 90%.
    out[f"{split}_error"] = 1.0 - sums[0] / n if cfg.model.enc_capsules else float("nan")
    out[f"{split}_n"] = int(sums[-1])
    if cfg.model.likelihood == "logistic":
        shape = cfg.model
        out[f"{split}_bits_per_dim"] = bits_per_dim(out[f"{split}_elbo"],
                                                    shape.in_channels * shape.height * shape.width)
    return out | caps


def eval_stream(cfg: Config, data_dir: str, batch_size: int, dp_rank: int, dp_size: int, split: str = "test"):
    """The test split (or `split`), each image once across ranks, binarised as the training data
    is, but with one fixed draw: with data.binarize=dynamic every test image gets the same
    Bernoulli sample at every evaluation (seeded by its index alone), the usual "fixed
    binarisation" of a test set. A 0.5 threshold instead would show the model silhouettes it
    never saw in training."""
    return EvalStream(data_dir, batch_size, dp_rank, dp_size, split=split, binarize=cfg.data.binarize, seed=0,
                      cache_dir=cfg.data.cache_dir or None)


def periodic_stream(cfg: Config, batch_size: int, dp_rank: int, dp_size: int):
    """What the training loop evaluates on: the validation split where `rcn prepare` made one
    (hyper-parameters are chosen on it), else the test split."""
    split = "val" if "val" in Manifest.load(cfg.data.dir, cfg.data.cache_dir or None).splits() else "test"
    return eval_stream(cfg, cfg.data.dir, batch_size, dp_rank, dp_size, split=split)

