"""Overlapping objects: does the RCN's capsule classifier recognise two overlapping Fashion-MNIST
items better than a convolutional network of the same size?

The study behind docs/model.md, "Overlapping objects". Pairs are made as MultiMNIST is
(rcn_dist.data.sources.synth_multimnist: two items of different classes, each shifted by up to 4
pixels in a 36x36 frame, added and clipped at 255). Three classifiers train at one budget (steps,
batch, Adam with the `small` preset's learning-rate schedule), each with --seeds seeds:
  rcn      the RCN `small` at 36x36, its encoder class capsules trained by the margin loss beside
           the generator (the whole loss, as `rcn train` trains it);
  capsnet  the encoder capsule network alone (the same EncoderCapsules), margin loss, no generator;
  cnn      a CNN with the capsule network's parameter count (within 10%), sigmoid outputs trained
           with binary cross-entropy on the multi-hot labels.
Each is scored on the test pairs (one pair per test item; no setting is chosen on them: the
budget and sizes are fixed up front) by the top-2 exact match (the two highest scores are exactly
the two classes), with a Wilson interval, split by how much the two items overlap, and on single
shifted test items (the top-1 error: the control).

    python launch/overlap_study.py --steps 600 --seeds 0 1 --out runs/overlap/results.jsonl

One JSON line per (model, seed) is appended to --out; --table prints the markdown table of a
results file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcn_dist.config import apply_overrides, preset
from rcn_dist.data import sources
from rcn_dist.model import RCN
from rcn_dist.model.losses import margin_loss, top_k_correct
from rcn_dist.model.rcn import EncoderCapsules
from rcn_dist.quality import wilson_interval

SIZE = sources.MULTI_SIZE
OVERLAP_BINS = (0.0, 0.25, 0.5, 0.75, 1.0001)
"""Bins of the overlap share (the smaller item's ink covered by the other's)."""
MODELS = ("rcn", "capsnet", "cnn")


class CNN(nn.Module):
    """(B, 1, 36, 36) -> conv 5x5 (c1) -> ReLU -> max-pool 2 -> conv 5x5 (c2) -> ReLU -> max-pool 2
    -> linear (hidden) -> ReLU -> linear (n_classes): one logit per class, sigmoid outputs."""

    def __init__(self, c1: int, c2: int, hidden: int, n_classes: int = 10) -> None:
        super().__init__()
        side = ((SIZE - 4) // 2 - 4) // 2  # 36 -> 32 -> 16 -> 12 -> 6
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def n_params(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def matched_cnn(target: int) -> CNN:
    """The CNN whose parameter count is nearest `target` over a grid of widths (within 10%, or an
    error: the comparison is only fair at the same size)."""
    best = min(((c1, c2, h) for c1 in (16, 32, 64) for c2 in (32, 64, 128) for h in range(16, 1025, 8)),
               key=lambda w: abs(n_params(CNN(*w)) - target))
    net = CNN(*best)
    if abs(n_params(net) - target) > 0.1 * target:
        raise SystemExit(f"no CNN within 10% of {target:,} parameters (nearest {n_params(net):,})")
    return net


def shifted_singles(images: np.ndarray, seed: int) -> np.ndarray:
    """Each 28x28 item alone in a 36x36 frame, shifted by up to 4 pixels each way (the control)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(images), SIZE, SIZE), np.uint8)
    corners = rng.integers(0, 2 * sources.MULTI_SHIFT + 1, size=(len(images), 2))
    for i, (y, x) in enumerate(corners):
        out[i, y:y + 28, x:x + 28] = images[i]
    return out


def multi_hot(pairs: np.ndarray, k: int = 10) -> Tensor:
    return F.one_hot(torch.from_numpy(pairs), k).amax(1).float()  # (N, 2) -> (N, k)


def lr_factor(step: int, warm: int, total: int, floor: float) -> float:
    """The `small` preset's schedule (rcn_dist.parallel.engine): linear warm-up, then cosine."""
    if step < warm:
        return (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def build(kind: str, seed: int) -> tuple[nn.Module, object]:
    cfg = apply_overrides(preset("small"), [f"model.height={SIZE}", f"model.width={SIZE}"])
    torch.manual_seed(seed)
    if kind == "rcn":
        return RCN(cfg.model), cfg
    caps = EncoderCapsules(cfg.model)
    if kind == "capsnet":
        return caps, cfg
    torch.manual_seed(seed)
    return matched_cnn(n_params(caps)), cfg


def scores(kind: str, model: nn.Module, x: Tensor) -> Tensor:
    """(B, 10) class scores: capsule lengths, or the CNN's logits."""
    if kind == "rcn":
        return model(x, x_caps=x).class_lengths
    if kind == "capsnet":
        return model(x).norm(dim=-1)
    return model(x)


def train(kind: str, seed: int, steps: int, batch: int, threads: int, x: Tensor, y: Tensor) -> tuple[nn.Module, dict]:
    model, cfg = build(kind, seed)
    torch.set_num_threads(threads)
    t, m = cfg.train, cfg.model
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.warmup_steps, steps, t.min_lr_ratio))
    gen = torch.Generator().manual_seed(1000 + seed)
    t0 = time.time()
    for s in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        if kind == "rcn":  # the whole RCN loss; the likelihood on the binarised image, capsules on grey
            xbin = torch.bernoulli(xb, generator=gen)
            terms = model.loss_terms(xbin, yb, x_caps=xb)
            loss = (terms["recon"] + terms["kl"] + m.margin_weight * terms["margin"]).mean()
        elif kind == "capsnet":
            loss = margin_loss(model(xb).norm(dim=-1), yb, m.m_plus, m.m_minus, m.margin_lambda).mean()
        else:
            loss = F.binary_cross_entropy_with_logits(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        if s % 250 == 0 or s == steps - 1:
            print(f"{kind} seed {seed} step {s} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    return model.eval(), {"params": n_params(model), "train_s": time.time() - t0}


@torch.no_grad()
def evaluate(kind: str, model: nn.Module, x: Tensor, y: Tensor, batch: int = 250) -> Tensor:
    """(N,) bool: right by top-k exact match (k = the number of labelled classes)."""
    return torch.cat([top_k_correct(scores(kind, model, x[i:i + batch]), y[i:i + batch])
                      for i in range(0, len(x), batch)])


def interval(hits: Tensor) -> dict[str, float]:
    k, n = int(hits.sum()), len(hits)
    lo, hi = wilson_interval(n - k, n)
    return {"error": 1 - k / n, "error_lo": lo, "error_hi": hi, "n": n}


def table(path: str) -> str:
    """The docs/model.md table of a results file: per model, mean over seeds (± half the range)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    bins = [f"{a:.2f}-{min(b, 1):.2f}" for a, b in zip(OVERLAP_BINS, OVERLAP_BINS[1:])]
    head = ("| model | params | seeds | two-item error (95% CI of seed 0) | "
            + " | ".join(f"overlap {b}" for b in bins) + " | single shifted error |")
    lines = [head, "|" + "---|" * (5 + len(bins))]

    def pm(vals: list[float]) -> str:
        return f"{100 * np.mean(vals):.1f} ± {50 * (max(vals) - min(vals)):.1f}%"

    for kind in MODELS:
        rs = [r for r in rows if r["model"] == kind]
        if not rs:
            continue
        r0 = rs[0]["pairs"]
        cells = [pm([r["by_overlap"][b]["error"] for r in rs]) for b in bins]
        lines.append(f"| {kind} | {rs[0]['params']:,} | {len(rs)} | {pm([r['pairs']['error'] for r in rs])} "
                     f"({100 * r0['error_lo']:.1f}-{100 * r0['error_hi']:.1f}) | " + " | ".join(cells)
                     + f" | {pm([r['single']['error'] for r in rs])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--pairs", type=int, default=2, help="training pairs per training item")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/overlap/results.jsonl")
    ap.add_argument("--table", help="print the markdown table of this results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    names = sources.FASHION_CLASSES
    x_tr, y_tr, _ = sources.read_idx_split(sources.FASHION_MNIST_DIR, "train", names)
    x_te, y_te, _ = sources.read_idx_split(sources.FASHION_MNIST_DIR, "test", names)
    # The training items' pairs (one fixed set, the same for every model and seed) and the test
    # items' pairs, each with its overlap share; the control: single shifted test items.
    pi, pl = sources.synth_multimnist(x_tr, y_tr, args.pairs, seed=0)
    ti, tl, overlap = sources.synth_multimnist(x_te, y_te, 1, seed=1, overlap=True)
    single = shifted_singles(x_te, seed=2)

    def grey(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).float().div(255).unsqueeze(1)

    x, y = grey(pi), multi_hot(pl)
    xt, yt, xs, ys = grey(ti), multi_hot(tl), grey(single), torch.from_numpy(y_te)
    print(f"{len(x):,} training pairs, {len(xt):,} test pairs (overlap share median "
          f"{np.median(overlap):.2f}), {len(xs):,} single shifted test items", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for kind in args.models:
            model, info = train(kind, seed, args.steps, args.batch, args.threads, x, y)
            hits = evaluate(kind, model, xt, yt)
            by = {}
            for a, b in zip(OVERLAP_BINS, OVERLAP_BINS[1:]):
                sel = torch.from_numpy((overlap >= a) & (overlap < b))
                by[f"{a:.2f}-{min(b, 1):.2f}"] = interval(hits[sel]) if sel.any() else {"error": float("nan"), "n": 0}
            res = {"model": kind, "seed": seed, "steps": args.steps, "batch": args.batch, **info,
                   "pairs": interval(hits), "by_overlap": by,
                   "single": interval(evaluate(kind, model, xs, ys))}
            print(json.dumps(res), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
