"""A short in-memory training run of `small` on Fashion-MNIST that reports capsule usage.

The study behind docs/model.md, "Do the capsules carry the image?": train for N steps with the
preset's optimizer settings (Adam, warm-up then cosine, clipping), then measure on 1,000 held-out
training images (a fixed choice, never the test set) the negative ELBO, KL, error, and what
shuffling or zeroing each capsule network's outputs costs, plus the capsules' spread and lengths.
It reads the IDX files directly and samples batches with replacement, so a variant takes minutes
on two cores; `rcn train` + `rcn eval` give the same figures for full runs.

    python launch/capsule_study.py 400 model.dec_z_skip=false
    python launch/capsule_study.py 400 model.dec_z_skip=true model.dec_caps_odd=false model.caps_init=torch
    python launch/capsule_study.py 400 model.dec_z_skip=false --caps-input binarized
    python launch/capsule_study.py 400 model.dec_z_skip=false --kl-warmup 200
    python launch/capsule_study.py 2500 --area-penalty 2 --delta-init 0.3 --seed 1 --save runs/s.pt

Beside the usage figures it measures, on the same held-out images, the write window (its mean
area as a share of the image, per step too) and, on --coverage prior samples, the class shares by
the data set's cached feature classifier (rcn_dist.quality; `rcn eval` trains it once): the
drawing-window search and the class-coverage search of docs/model.md read these. Two research
knobs that are not model settings: --area-penalty adds L nats per unit of write-window area per
step to the training loss, --delta-init starts the write window's stride at that share of the
whole-image stride (DRAW's initialisation spans the image).

Prints a progress line every 100 steps and one JSON line of results (also appended to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rcn_dist import quality
from rcn_dist.config import apply_overrides, from_dict, preset
from rcn_dist.data import sources
from rcn_dist.model import RCN
from rcn_dist.model.attention import window_area, window_params
from rcn_dist.model.usage import ablation_elbos, capsule_stats
from rcn_dist.sample import generate, window_figures

ABLATIONS = ("encoder_shuffle", "encoder_zero", "decoder_shuffle", "decoder_zero")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("steps", type=int)
    ap.add_argument("overrides", nargs="*", help="section.field=value over the small preset")
    ap.add_argument("--caps-input", choices=("grey", "binarized"), default="grey",
                    help="what the encoder capsules see (data.caps_input)")
    ap.add_argument("--kl-warmup", type=int, default=0, help="steps of a linear KL weight ramp 0 -> 1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="weights and batches (0: the study's figures)")
    ap.add_argument("--area-penalty", type=float, default=0.0,
                    help="nats per unit of write-window area per step, added to the training loss")
    ap.add_argument("--delta-init", type=float, default=0.0,
                    help="initial write-window stride as a share of the whole-image stride (0: DRAW's)")
    ap.add_argument("--coverage", type=int, default=5000,
                    help="prior samples classified for the class shares (0: skip)")
    ap.add_argument("--data", default="data/fashion-mnist",
                    help="prepared shards whose cached feature classifier --coverage uses")
    ap.add_argument("--save", help="write the trained model's config and weights here (torch.save)")
    ap.add_argument("--load", help="measure a model --save wrote instead of training one (steps: 0)")
    ap.add_argument("--out", help="a JSON-lines file to append the result to")
    args = ap.parse_intermixed_args()  # overrides may follow the options

    saved = torch.load(args.load, map_location="cpu", weights_only=False) if args.load else None
    cfg = from_dict(saved["config"]) if saved else apply_overrides(preset("small"), args.overrides)
    m = cfg.model
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x, y, _ = sources.read_idx_split(sources.FASHION_MNIST_DIR, "train", sources.FASHION_CLASSES)
    perm = np.random.default_rng(0).permutation(len(x))  # 5,000 held out, 1,000 of them measured
    images = torch.from_numpy(x.copy()).float().div(255).unsqueeze(1)  # (N, 1, 28, 28) grey
    labels = torch.from_numpy(y)
    x_tr, y_tr = images[perm[5000:]], labels[perm[5000:]]
    x_va, y_va = images[perm[:5000]][:1000], labels[perm[:5000]][:1000]
    x_va_bin = torch.bernoulli(x_va, generator=torch.Generator().manual_seed(1))
    grey = args.caps_input == "grey"

    model = RCN(m)
    if saved:
        model.load_state_dict(saved["model"])
    writer = model.decoder.writer
    if args.delta_init and writer is not None:
        with torch.no_grad():  # p[3] = log delta~: the stride is (max(A, B) - 1) / (N - 1) * exp(p[3])
            writer.window.bias[3] = math.log(args.delta_init)
    areas: list[Tensor] = []  # the write windows' areas (B,) of the current forward, with gradient
    if args.area_penalty and writer is not None:
        def keep_area(mod, inp, p):
            w = window_params(p, m.height, m.width, m.write_n)
            areas.append(window_area(w["cx"], w["cy"], w["delta"], m.write_n, m.height, m.width))
        writer.window.register_forward_hook(keep_area)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    warm, total = cfg.train.warmup_steps, 0 if saved else args.steps

    def lr_factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        p = (s - warm) / max(1, total - warm)
        return cfg.train.min_lr_ratio + (1 - cfg.train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(2 + 1000 * args.seed)
    t0 = time.time()
    for s in range(total):
        idx = torch.randint(0, len(x_tr), (cfg.train.batch_size,), generator=gen)
        xb, yb = torch.bernoulli(x_tr[idx], generator=gen), y_tr[idx]
        areas.clear()
        terms = model.loss_terms(xb, yb, x_caps=x_tr[idx] if grey else None)
        beta = min(1.0, (s + 1) / args.kl_warmup) if args.kl_warmup else 1.0
        loss = (terms["recon"] + beta * terms["kl"] + m.margin_weight * terms["margin"]).mean()
        if areas:
            loss = loss + args.area_penalty * torch.stack(areas).sum(0).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        if s % 100 == 0 or s == total - 1:
            st = capsule_stats(model, xb, torch.randn(len(xb), m.T, m.z_dim), x_tr[idx] if grey else None)
            print(f"step {s} elbo {terms['elbo'].mean():.1f} kl {terms['kl'].mean():.2f} "
                  f"margin {terms['margin'].mean():.3f} "
                  + " ".join(f"{k} {v:.3f}" for k, v in st.items()) + f" {time.time() - t0:.0f}s", flush=True)

    model.eval()
    areas.clear()
    sums = {k: 0.0 for k in ("elbo", "kl", "err", *ABLATIONS)}
    stats, wins = [], []
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i in range(0, len(x_va), 250):
            xb, yb = x_va_bin[i:i + 250], y_va[i:i + 250]
            xc = x_va[i:i + 250] if grey else None
            eps = torch.randn(len(xb), m.T, m.z_dim, generator=noise)
            t = model.loss_terms(xb, yb, eps, x_caps=xc)
            sums["elbo"] += t["elbo"].sum().item()
            sums["kl"] += t["kl"].sum().item()
            sums["err"] += (~t["correct"]).sum().item()
            el = ablation_elbos(model, xb, yb, eps, xc)
            for k in ABLATIONS:
                if k in el:
                    sums[k] += (el[k] - el["none"]).sum().item()
            stats.append(capsule_stats(model, xb, eps, xc))
            if writer is not None:
                wins.append(model(xb, eps, x_caps=xc).write_windows)
    res = {k: v / len(x_va) for k, v in sums.items()}
    res |= {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
    if wins:  # the posterior's windows on the held-out images
        w = {k: torch.cat([b[k] for b in wins]) for k in wins[0]}
        res |= {f"posterior_{k}": v for k, v in window_figures(w, m.write_n, m.height, m.width).items()}
    if args.coverage:
        res |= prior_figures(model, args.coverage, args.data, cfg.eval.classifier_steps)
    if args.save:
        torch.save({"config": dataclasses.asdict(cfg), "model": model.state_dict()}, args.save)
    res |= {"steps": total, "overrides": args.overrides, "caps_input": args.caps_input,
            "kl_warmup": args.kl_warmup, "seed": args.seed, "area_penalty": args.area_penalty,
            "delta_init": args.delta_init, "train_s": time.time() - t0}
    print(json.dumps(res), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


@torch.no_grad()
def prior_figures(model: RCN, n: int, data_dir: str, classifier_steps: int) -> dict[str, object]:
    """n prior samples (seed 0): their write windows (rcn_dist.sample.window_figures) and their
    class shares by the data set's cached feature classifier (quality.class_histogram against the
    test split's shares, which name no test image: the classifier's own predictions)."""
    m = model.cfg
    canvases, windows = generate(model, n, seed=0, device="cpu", batch=500)
    out: dict[str, object] = {}
    if windows is not None:
        out |= {f"prior_{k}": v for k, v in window_figures(windows, m.write_n, m.height, m.width).items()}
    cache = quality.classifier_dir(data_dir, Path(data_dir))
    net, known = quality.feature_classifier(data_dir, cache, classifier_steps)
    means = canvases[:, -1]  # (n, C, H, W) the decoder's means: generate returns them in [0, 1]
    test_x = torch.cat([b[0] for b in quality._grey_batches(data_dir, "test")])
    hist = quality.class_histogram(quality.logits_of(net, means), quality.logits_of(net, test_x),
                                   list(sources.FASHION_CLASSES))
    return out | hist | {"coverage_samples": n, "classifier_test_accuracy": known.get("test_accuracy")}


if __name__ == "__main__":
    main()
