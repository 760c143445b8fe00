"""Pose and position: how much of an image's shift and rotation each representation holds, and
whether a shifted image's representation follows from the original's by a linear map.

The study behind docs/model.md, "Pose and position". Models come from
`launch/capsule_study.py --save` (an RCN and a DRAW run at one budget); the CNN baseline is trained
here (the same convolutions as the feature classifier's family, a penultimate layer of the class
capsules' width). Representations of a test image x:
  class_caps   the RCN's encoder class capsules, (n_classes * class_caps_dim);
  rcn_mu       the RCN's posterior means over the T steps, (T * z_dim);
  dec_caps     the RCN's decoder capsules over the T steps (on the posterior's z), (T * K * D);
  draw_mu      DRAW's posterior means, (T * z_dim);
  cnn          the CNN's penultimate features, (n_classes * class_caps_dim).
The noise of every forward is the same fixed draw, for x and for its transformed copy.

1. The probe: each test image is shifted by (dx, dy) in -3..3 pixels and rotated by up to 15
   degrees at random; ridge regression from the representation (standardised) to (dx, dy, angle),
   5-fold cross-validated R^2 per target (the ridge strength chosen inside each training fold).
2. The equivariance fit: for a fixed transformation g (a 2-pixel shift right, down, a 10-degree
   rotation), a linear map M_g fitted on half the images from f(x) to f(g x), scored by R^2 of
   f(g x) on the other half, against "no change" (f(x) itself as the prediction of f(g x)).

    python launch/pose_study.py --rcn runs/study/base_s0.pt --draw runs/study/draw_s0.pt

Prints the markdown tables and writes one JSON file (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcn_dist.config import from_dict
from rcn_dist.data import sources
from rcn_dist.model import RCN

ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
"""Ridge strengths tried (on standardised inputs, times the number of samples)."""
FIXED = {"shift right 2": (2, 0, 0.0), "shift down 2": (0, 2, 0.0), "rotate 10": (0, 0, 10.0)}


def transform(x: Tensor, dx: Tensor, dy: Tensor, angle: Tensor) -> Tensor:
    """x (B, 1, H, W) shifted by (dx, dy) pixels (right, down) and rotated by angle degrees about
    the centre; bilinear, zeros outside."""
    b, _, h, w = x.shape
    a = angle.double().deg2rad()
    cos, sin = a.cos(), a.sin()
    # affine_grid maps output coordinates to input ones, in [-1, 1]: the inverse transform.
    tx, ty = -2 * dx.double() / w, -2 * dy.double() / h
    theta = torch.stack([torch.stack([cos, sin, cos * tx + sin * ty], 1),
                         torch.stack([-sin, cos, -sin * tx + cos * ty], 1)], 1).float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


class CNN(nn.Module):
    """(B, 1, 28, 28) -> conv 5x5 (32) -> ReLU -> pool 2 -> conv 5x5 (64) -> ReLU -> pool 2 ->
    linear (width) -> ReLU = features -> linear (10)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, width), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def train_cnn(x: Tensor, y: Tensor, width: int, steps: int, seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    net = CNN(width)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def load(path: str) -> RCN:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model = RCN(from_dict(saved["config"]).model)
    model.load_state_dict(saved["model"])
    return model.eval()


@torch.no_grad()
def rcn_views(model: RCN, x: Tensor, batch: int = 250) -> dict[str, Tensor]:
    """{class_caps, mu, dec_caps} of grey images x (N, 1, H, W), the likelihood's input
    binarised at 0.5, the same noise for every image."""
    m = model.cfg
    caps_out: list[Tensor] = []
    hook = (model.decoder.capsules.register_forward_hook(lambda mod, i, o: caps_out.append(o.flatten(1)))
            if model.decoder.capsules is not None else None)
    eps = torch.randn(1, m.T, m.z_dim, generator=torch.Generator().manual_seed(0))
    out: dict[str, list[Tensor]] = {"class_caps": [], "mu": [], "dec_caps": []}
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        caps_out.clear()
        o = model((xb > 0.5).float(), eps.expand(len(xb), -1, -1), x_caps=xb)
        out["class_caps"].append(o.class_caps.flatten(1))
        out["mu"].append(o.mu.flatten(1))
        if caps_out:
            out["dec_caps"].append(torch.cat(caps_out, 1))  # T calls, (B, K*D) each
    if hook is not None:
        hook.remove()
    return {k: torch.cat(v) for k, v in out.items() if v}


def _scale(train: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std per column of train; a column (nearly) constant there keeps unit scale, so that
    a unit that is dead on the training rows cannot blow up on the others."""
    std = train.std(0)
    return train.mean(0), torch.where(std > 1e-3, std, torch.ones_like(std))


def standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = _scale(train)
    return [(t - mean) / std for t in (train, *others)]


def ridge(x: Tensor, y: Tensor, alpha: float) -> Tensor:
    """Weights (D + 1, K) of ridge regression y ~ [x, 1] W (the bias not penalised)."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    reg = alpha * len(x) * torch.eye(xb.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0
    return torch.linalg.solve(xb.T @ xb + reg, xb.T @ y)


def predict(x: Tensor, w: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w


def r2(pred: Tensor, y: Tensor) -> Tensor:
    """R^2 per column (K,)."""
    return 1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0).clamp_min(1e-12)


def fit_ridge(x: Tensor, y: Tensor) -> Tensor:
    """Ridge with the strength chosen by an inner split of (x, y) (its last fifth held out)."""
    cut = len(x) * 4 // 5
    xa, xv = standardise(x[:cut], x[cut:])
    best = max(ALPHAS, key=lambda a: r2(predict(xv, ridge(xa, y[:cut], a)), y[cut:]).mean().item())
    xs, = standardise(x)
    return ridge(xs, y, best)


def cv_r2(x: Tensor, y: Tensor, folds: int = 5) -> Tensor:
    """Cross-validated R^2 per target column: each fold predicted by a ridge fitted on the rest."""
    pred = torch.empty_like(y)
    idx = torch.arange(len(x))
    for f in range(folds):
        test = idx % folds == f
        w = fit_ridge(x[~test], y[~test])
        _, xt = standardise(x[~test], x[test])
        pred[test] = predict(xt, w)
    return r2(pred, y)


def equivariance(fx: Tensor, fgx: Tensor) -> tuple[float, float]:
    """(R^2 of f(gx) predicted by a linear map of f(x), R^2 of f(x) itself as the prediction), both
    on the second half, over all dimensions together, in f(gx)'s standardised units."""
    half = len(fx) // 2
    w = fit_ridge(fx[:half], fgx[:half])
    _, xt = standardise(fx[:half], fx[half:])
    mean, std = _scale(fgx[:half])
    target = (fgx[half:] - mean) / std

    def total(pred: Tensor) -> float:
        return 1 - (((pred - mean) / std - target) ** 2).sum().item() / ((target - target.mean(0)) ** 2).sum().item()

    return total(predict(xt, w)), total(fx[half:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rcn", required=True, help="an RCN saved by capsule_study.py --save")
    ap.add_argument("--draw", help="a DRAW model saved the same way (no capsules)")
    ap.add_argument("--images", type=int, default=2000, help="test images probed")
    ap.add_argument("--cnn-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/pose/pose.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    names = sources.FASHION_CLASSES
    x_tr, y_tr, _ = sources.read_idx_split(sources.FASHION_MNIST_DIR, "train", names)
    x_te, _, _ = sources.read_idx_split(sources.FASHION_MNIST_DIR, "test", names)

    def grey(a) -> Tensor:
        return torch.from_numpy(a.copy()).float().div(255).unsqueeze(1)

    x = grey(x_te[:args.images])
    g = torch.Generator().manual_seed(1)
    n = len(x)
    dx, dy = (torch.randint(-3, 4, (n,), generator=g) for _ in range(2))
    angle = (torch.rand(n, generator=g) * 2 - 1) * 15
    xg = transform(x, dx.float(), dy.float(), angle)
    targets = torch.stack([dx.double(), dy.double(), angle.double()], 1)

    rcn = load(args.rcn)
    width = rcn.cfg.n_classes * rcn.cfg.class_caps_dim
    cnn = train_cnn(grey(x_tr), torch.from_numpy(y_tr), width, args.cnn_steps)

    def views(images: Tensor) -> dict[str, Tensor]:
        v = rcn_views(rcn, images)
        out = {"class_caps": v["class_caps"], "rcn_mu": v["mu"]}
        if "dec_caps" in v:
            out["dec_caps"] = v["dec_caps"]
        if args.draw:
            out["draw_mu"] = rcn_views(load(args.draw), images)["mu"]
        with torch.no_grad():
            out["cnn"] = cnn.body(images)
        return {k: t.double() for k, t in out.items()}

    probed = views(xg)
    results: dict[str, dict] = {"probe": {}, "equivariance": {}, "images": n}
    for k, rep in probed.items():
        s = cv_r2(rep, targets)
        results["probe"][k] = {"dim": rep.shape[1], "dx": s[0].item(), "dy": s[1].item(), "angle": s[2].item()}
    base = views(x)
    for gname, (sx, sy, rot) in FIXED.items():
        moved = views(transform(x, torch.full((n,), float(sx)), torch.full((n,), float(sy)), torch.full((n,), rot)))
        results["equivariance"][gname] = {k: dict(zip(("linear_map", "no_change"), equivariance(base[k], moved[k])))
                                          for k in base}
    results["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("| representation | dim | R² dx | R² dy | R² angle |\n|---|---|---|---|---|")
    for k, r in results["probe"].items():
        print(f"| {k} | {r['dim']} | {r['dx']:.3f} | {r['dy']:.3f} | {r['angle']:.3f} |")
    print("\n| representation | " + " | ".join(f"{g}: map / no change" for g in FIXED) + " |\n|---|"
          + "---|" * len(FIXED))
    for k in base:
        cells = [f"{results['equivariance'][g][k]['linear_map']:.3f} / {results['equivariance'][g][k]['no_change']:.3f}"
                 for g in FIXED]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print(f"\n{math.ceil(results['seconds'])} s")


if __name__ == "__main__":
    main()
