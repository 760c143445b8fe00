"""Sample-quality figures of `rcn eval`: nearest-neighbour distances and a Frechet distance.

Both compare grey levels in [0, 1] (samples: sigmoid(c_T); data: x / 255), flattened to C*H*W.
docs/evaluation.md says what each figure measures, the memorisation flag and why the Frechet
distance is taken in the feature space of `FeatureNet`, trained here on the run's own shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NN_RATIO_FLAG = 0.25
"""Flag memorisation when the generated samples' median nearest-neighbour distance is below this
fraction of the test images' median."""
NN_COPY_FRAC = 0.1
"""A sample within this fraction of the test images' median distance of a training image is a
near-copy."""
NN_COPY_SHARE = 0.05
"""Flag memorisation when more than this share of the samples are near-copies."""
FEATURE_DIM = 64
"""Width of FeatureNet's penultimate layer: the Frechet distance's feature space."""


# ---------------------------------------------------------------- nearest neighbour
def nearest_neighbours(generated: Tensor, test: Tensor, train_batches: Iterable[Tensor],
                       limit: int = 0) -> tuple[dict[str, float | bool], Tensor]:
    """Nearest-training-image distances of generated samples and of test images.

    generated (N, D), test (M, D): grey images in [0, 1]; train_batches yields (B, D) training
    images, of which the first `limit` are searched (0: all), one batch at a time: memory is
    O((N + M) * (D + B)), whatever the size of the training set. Returns the summary of both sets'
    distances, the memorisation flag and nn_train_images (how many were searched), and the nearest
    training image of each generated sample (N, D), for pictures.
    """
    queries = torch.cat([generated, test]).double()
    dist = torch.full((len(queries),), float("inf"), dtype=torch.float64)
    nearest, seen = torch.zeros_like(queries), 0
    for batch in train_batches:
        b = (batch[: limit - seen] if limit else batch).double()
        if len(b):
            arg = torch.cdist(queries, b).argmin(dim=1)  # (Q,); cdist's matmul form is not exact
            best = (queries - b[arg]).norm(dim=1)  # exact, so that a copy is at distance 0
            better = best < dist
            dist[better] = best[better]
            nearest[better] = b[arg[better]]
            seen += len(b)
        if limit and seen >= limit:
            break
    if seen == 0:
        raise ValueError("no training images to search")
    gen_dist, test_dist = dist[:len(generated)], dist[len(generated):]
    g_med, t_med = gen_dist.median().item(), test_dist.median().item()
    ratio = g_med / t_med if t_med > 0 else float("inf")
    copies = (gen_dist < NN_COPY_FRAC * t_med).double().mean().item()
    return {
        "nn_gen_median": g_med, "nn_gen_mean": gen_dist.mean().item(), "nn_gen_min": gen_dist.min().item(),
        "nn_test_median": t_med, "nn_test_mean": test_dist.mean().item(),
        "nn_ratio": ratio, "nn_copy_share": copies,
        "memorised": bool(ratio < NN_RATIO_FLAG or copies > NN_COPY_SHARE), "nn_train_images": seen,
    }, nearest[:len(generated)]


# ---------------------------------------------------------------- Frechet distance
def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets a (N, d) and b (M, d).

    Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2), which has the same spectrum, in float64.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    mid = root_a @ s_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt)


class FeatureNet(nn.Module):
    """The small classifier whose penultimate layer is the Frechet feature space.

    (B, C, H, W) in [0, 1] -> conv 3x3 (32) -> ReLU -> max-pool 2 -> conv 3x3 (64) -> ReLU ->
    max-pool 2 -> adaptive average pool to 3x3 -> linear (FEATURE_DIM) -> ReLU = features ->
    linear (n_classes) = logits.
    """

    def __init__(self, in_channels: int, n_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(64 * 9, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def feature_classifier(data_dir: str | Path, cache_dir: Path, steps: int, seed: int = 0,
                       batch_size: int = 64, progress: bool = False, device: str = "cpu") -> FeatureNet:
    """The FeatureNet for a data set: loaded from `cache_dir` when it was trained there for the
    same data and steps, else trained with Adam (lr 1e-3) for `steps` batches of grey training
    images and saved there (model.safetensors + meta.json)."""
    from safetensors.torch import load_file, save_file

    from rcn_dist import console
    from rcn_dist.data.loader import Manifest, TrainStream
    from rcn_dist.parallel.engine import build_adam

    manifest = Manifest.load(data_dir)
    c, _, _ = manifest.image_shape
    shards = hashlib.sha256("".join(e["sha256"] for e in manifest.shards("train")).encode()).hexdigest()
    identity = {"dataset": manifest.dataset, "train_shards_sha256": shards,
                "steps": steps, "seed": seed, "batch_size": batch_size, "feature_dim": FEATURE_DIM,
                "in_channels": c, "n_classes": manifest.n_classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(c, manifest.n_classes)
    meta, weights = cache_dir / "meta.json", cache_dir / "model.safetensors"
    if meta.is_file() and weights.is_file():
        try:
            cached = json.loads(meta.read_text())
        except ValueError:
            cached = {}
        if cached.get("identity") == identity:
            net.load_state_dict(load_file(str(weights)))
            return net.to(device).eval()
    net = net.to(device).train()
    opt = build_adam(net.parameters(), 1e-3)
    batches = iter(TrainStream(data_dir, batch_size, 0, 1, seed, binarize="none"))
    for _ in console.track(range(steps), "feature classifier", enabled=progress):
        batch = next(batches)
        logits, y = net(batch["image"].to(device)), batch["label"].to(device)
        # integer labels (B,): cross-entropy; multi-hot (B, K): per-class binary cross-entropy
        loss = (F.cross_entropy(logits, y) if y.dim() == 1
                else F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(weights))
    meta.write_text(json.dumps({"identity": identity, "arch": FeatureNet.__doc__.split("\n\n")[1].strip()},
                               indent=1))
    return net.eval()


@torch.no_grad()
def features(net: FeatureNet, images: Tensor, batch_size: int = 256) -> Tensor:
    """(N, C, H, W) -> (N, FEATURE_DIM) float64, in batches."""
    dev = next(net.parameters()).device
    return torch.cat([net.body(images[i:i + batch_size].to(dev)).double().cpu()
                      for i in range(0, len(images), batch_size)])
