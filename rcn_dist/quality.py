"""Sample-quality figures of `rcn eval`: nearest neighbours and the data-copying test, a feature
classifier with the Frechet distance and the class histogram, and a classifier two-sample test.

Images are grey levels in [0, 1] (samples: sigmoid(c_T); data: x / 255), flattened to C*H*W for
the distances. docs/evaluation.md says what each figure measures, the memorisation flag, and why
the Frechet distance is taken in the feature space of `FeatureNet`, trained here on the data
set's own training shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from rcn_dist import console
from rcn_dist.data.loader import EvalStream, Manifest, load_arrays
from rcn_dist.errors import DataError
from rcn_dist.files import atomic_write
from rcn_dist.model.losses import top_k_correct
from rcn_dist.parallel.engine import build_adam

NN_RATIO_FLAG = 0.25
"""Flag memorisation when the generated samples' median nearest-neighbour distance is below this
fraction of the test images' median."""
NN_COPY_FRAC = 0.1
"""A sample within this fraction of the test images' median distance of a training image is a
near-copy."""
NN_COPY_SHARE = 0.05
"""Flag memorisation when more than this share of the samples are near-copies."""
FEATURE_DIM = 128
"""Width of FeatureNet's penultimate layer: the Frechet distance's feature space."""
CLASSIFIER_SEED = 0
"""Seed of the feature classifier's weights and data order: one classifier per data set, whatever
run it evaluates."""
CLASSIFIER_BATCH = 128
CLASSIFIER_LR = 3e-3
"""Peak learning rate of the classifier's one-cycle schedule (Adam)."""
KMEANS_FIT_IMAGES = 10000
"""Training images the data-copying test's k-means cells are fitted on (all are then assigned)."""
KMEANS_ITERS = 25
COPY_MIN_SAMPLES = 20
"""A cell counts in the data-copying statistic only with at least this many generated samples
(Meehan et al.'s Pi_tau), and at least one test image."""
C2ST_EPOCHS = 5
"""Epochs of the two-sample test's classifier over its training half, at least."""
C2ST_MIN_STEPS = 200
"""Optimizer steps the two-sample test's classifier takes at least (more epochs for small sets)."""


# ---------------------------------------------------------------- nearest neighbours, data copying
def kmeans(x: Tensor, k: int, iters: int = KMEANS_ITERS, seed: int = 0) -> Tensor:
    """Lloyd's k-means with k-means++ seeding: x (N, D) -> centroids (k, D) float32. An empty
    cell is re-seeded at the point farthest from its centroid."""
    x = x.float()
    if len(x) < k:
        raise ValueError(f"k-means with {k} cells needs at least {k} points, got {len(x)}")
    g = torch.Generator().manual_seed(seed)
    cent = x[torch.randint(len(x), (1,), generator=g)]
    d2 = torch.cdist(x, cent).pow(2).min(1).values
    for _ in range(1, k):  # k-means++: the next centre with probability ~ squared distance
        nxt = x[torch.multinomial(d2.clamp_min(0) + 1e-12, 1, generator=g)]
        cent = torch.cat([cent, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).pow(2)[:, 0])
    for _ in range(iters):
        dists = torch.cdist(x, cent)  # (N, k)
        cell = dists.argmin(1)
        counts = torch.bincount(cell, minlength=k)
        new = torch.zeros_like(cent).index_add_(0, cell, x) / counts.clamp_min(1)[:, None].float()
        far = dists.gather(1, cell[:, None])[:, 0]
        for c in (counts == 0).nonzero()[:, 0].tolist():
            j = int(far.argmax())
            new[c], far[j] = x[j], -1.0
        if torch.equal(new, cent):
            break
        cent = new
    return cent


def _cells(x: Tensor, centroids: Tensor) -> Tensor:
    """The nearest centroid of each row of x (N, D): (N,) int64."""
    return torch.cdist(x.float(), centroids).argmin(1)


def search_training_set(queries: Tensor, train_batches: Iterable[Tensor], limit: int = 0,
                        centroids: Tensor | None = None) -> dict[str, Any]:
    """The nearest training image of each query, and with `centroids` (k, D) also its nearest
    training image in its own k-means cell.

    queries (Q, D) grey images; train_batches yields (B, D) training images, of which the first
    `limit` are searched (0: all), one batch at a time: memory is O(Q * (D + B)), whatever the
    size of the training set. The search compares squared distances in float32 (one matmul per
    batch), then takes the exact float64 distance to the image it chose, so that a copy is at
    distance 0. Returns dist (Q,) float64, nearest (Q, D), seen (training images searched) and,
    with centroids, cells (Q,) and cell_dist (Q,) (inf where a cell holds no training image).
    """
    q32, q64 = queries.float(), queries.double()
    q_sq = q32.pow(2).sum(1, keepdim=True)  # (Q, 1)
    dist = torch.full((len(queries),), math.inf, dtype=torch.float64)
    nearest, seen = torch.zeros_like(q64), 0
    cells = None if centroids is None else _cells(q32, centroids)
    cell_dist = None if centroids is None else dist.clone()
    for batch in train_batches:
        b = (batch[: limit - seen] if limit else batch).float()
        if len(b):
            d2 = q_sq + b.pow(2).sum(1) - 2 * q32 @ b.T  # (Q, B), float32
            arg = d2.argmin(1)
            best = (q64 - b[arg].double()).norm(dim=1)
            better = best < dist
            dist[better], nearest[better] = best[better], b[arg[better]].double()
            if centroids is not None:
                same = cells[:, None] == _cells(b, centroids)[None, :]  # (Q, B)
                d2 = d2.masked_fill(~same, math.inf)
                arg = d2.argmin(1)
                has = same.any(1)
                best = torch.where(has, (q64 - b[arg].double()).norm(dim=1), math.inf)
                cell_dist = torch.minimum(cell_dist, best)
            seen += len(b)
        if limit and seen >= limit:
            break
    if seen == 0:
        raise ValueError("no training images to search")
    out = {"dist": dist, "nearest": nearest, "seen": seen}
    if centroids is not None:
        out |= {"cells": cells, "cell_dist": cell_dist}
    return out


def nearest_neighbour_figures(gen_dist: Tensor, test_dist: Tensor, seen: int) -> dict[str, float | bool]:
    """The summary of the samples' (N,) and the test images' (M,) nearest-training-image distances
    and the memorisation flag."""
    g_med, t_med = gen_dist.median().item(), test_dist.median().item()
    ratio = g_med / t_med if t_med > 0 else float("inf")
    copies = (gen_dist < NN_COPY_FRAC * t_med).double().mean().item()
    return {
        "nn_gen_median": g_med, "nn_gen_mean": gen_dist.mean().item(), "nn_gen_min": gen_dist.min().item(),
        "nn_test_median": t_med, "nn_test_mean": test_dist.mean().item(),
        "nn_ratio": ratio, "nn_copy_share": copies,
        "memorised": bool(ratio < NN_RATIO_FLAG or copies > NN_COPY_SHARE), "nn_train_images": seen,
    }


def nearest_neighbours(generated: Tensor, test: Tensor, train_batches: Iterable[Tensor],
                       limit: int = 0) -> tuple[dict[str, float | bool], Tensor]:
    """Nearest-training-image figures of generated samples (N, D) and test images (M, D)
    (`nearest_neighbour_figures`), and the nearest training image of each sample (N, D)."""
    found = search_training_set(torch.cat([generated, test]), train_batches, limit)
    n = len(generated)
    return nearest_neighbour_figures(found["dist"][:n], found["dist"][n:], found["seen"]), found["nearest"][:n]


def mann_whitney_z(gen: Tensor, test: Tensor) -> float:
    """Z-scored Mann-Whitney U of gen (m,) against test (n,): U counts the pairs in which the
    generated value is the larger (ties half), Z = (U - (m n / 2 - 1/2)) / sqrt(m n (m + n + 1) / 12),
    with the continuity correction of Meehan et al.'s reference code. Z << 0: gen is smaller."""
    m, n = len(gen), len(test)
    g, t = gen.double()[:, None], test.double()[None, :]
    u = (g > t).sum().item() + 0.5 * (g == t).sum().item()
    return (u - (m * n / 2 - 0.5)) / math.sqrt(m * n * (m + n + 1) / 12)


def data_copying(gen_dist: Tensor, gen_cells: Tensor, test_dist: Tensor, test_cells: Tensor,
                 k: int, min_samples: int = COPY_MIN_SAMPLES) -> dict[str, Any]:
    """Meehan, Chaudhuri & Dasgupta (2020)'s data-copying statistic C_T from in-cell distances.

    gen_dist (m,), test_dist (n,): each generated sample's and held-out test image's distance to
    its nearest training image in its own cell; gen_cells, test_cells: the cells (k-means on the
    training set). Per cell pi, Z_U(pi) = mann_whitney_z(generated, test) of the distances in it;
    C_T = sum_pi P_n(pi) Z_U(pi) / sum_pi P_n(pi) over the cells with at least `min_samples`
    generated samples and a test image, P_n(pi) the share of test images in pi. C_T << 0 (say
    below -3): the samples sit closer to the training images than unseen data do (copying);
    about 0: as close as unseen data; >> 0: farther (underfitting).
    """
    zs: list[float | None] = []
    weights, used = [], []
    for c in range(k):
        g, t = gen_dist[gen_cells == c], test_dist[test_cells == c]
        ok = len(g) >= min_samples and len(t) > 0 and bool(torch.isfinite(g).all() and torch.isfinite(t).all())
        z = mann_whitney_z(g, t) if ok else None
        zs.append(z)
        if z is not None:
            weights.append(len(t) / len(test_dist))
            used.append(z)
    c_t = sum(w * z for w, z in zip(weights, used)) / sum(weights) if used else float("nan")
    return {"copy_zu": c_t, "copy_zu_cells": zs, "copy_cells": k, "copy_cells_used": len(used),
            "copy_zu_min": min(used) if used else float("nan")}


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


def frechet_interval(a: Tensor, b: Tensor, resamples: int, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """A bootstrap interval of frechet_distance(a, b) (a (N, d), b (M, d)): both sets resampled
    with replacement `resamples` times, the quantiles of the resampled distances centred on the
    estimate, fd + (q - mean of the resampled distances). Centred, because a resample repeats
    points, which shrinks its covariance's rank and inflates its distance: the raw percentiles
    can lie wholly above the estimate. It shows the estimate's sampling spread at this many
    samples, not its bias (the distance of finite samples is biased upwards)."""
    g = torch.Generator().manual_seed(seed)
    fds = torch.tensor([frechet_distance(a[torch.randint(len(a), (len(a),), generator=g)],
                                         b[torch.randint(len(b), (len(b),), generator=g)])
                        for _ in range(resamples)], dtype=torch.float64)
    tail, shift = (1 - level) / 2, frechet_distance(a, b) - fds.mean().item()
    return torch.quantile(fds, tail).item() + shift, torch.quantile(fds, 1 - tail).item() + shift


# ---------------------------------------------------------------- the feature classifier
class FeatureNet(nn.Module):
    """The classifier whose penultimate layer is the Frechet feature space.

    (B, C, H, W) in [0, 1] -> conv 3x3 (16) -> batch norm -> ReLU -> max-pool 2 -> conv 3x3 (32)
    -> batch norm -> ReLU -> max-pool 2 -> linear (FEATURE_DIM) -> ReLU = features -> linear
    (n_classes) = logits.
    """

    def __init__(self, in_channels: int, n_classes: int, height: int = 28, width: int = 28) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def classifier_dir(data_dir: str | Path, run_dir: Path) -> Path:
    """Where the data set's feature classifier is cached: beside its shards (DATA_DIR/
    feature_classifier, shared by every run on that data) where that directory is writable, else
    under the run (RUN_DIR/eval_classifier)."""
    data = Path(data_dir)
    return data / "feature_classifier" if os.access(data, os.W_OK) else run_dir / "eval_classifier"


def _grey_batches(data_dir: str | Path, split: str, batch: int = 512) -> Iterator[tuple[Tensor, Tensor]]:
    for b in EvalStream(data_dir, batch, 0, 1, split=split, binarize="none"):
        yield b["image"][b["mask"]], b["label"][b["mask"]]


@torch.no_grad()
def logits_of(net: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """(N, C, H, W) -> (N, n_classes) float32 on the CPU, in batches on the net's device."""
    dev = next(net.parameters()).device
    return torch.cat([net(images[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def split_accuracy(net: FeatureNet, data_dir: str | Path, split: str) -> float:
    """The classifier's accuracy on a whole split (MultiMNIST: both of the top 2 right)."""
    right = n = 0
    for x, y in _grey_batches(data_dir, split):
        right += int(top_k_correct(logits_of(net, x), y).sum())
        n += len(x)
    return right / max(n, 1)


def _read_cache(meta: Path, weights: Path, identity: dict[str, Any], net: FeatureNet) -> dict[str, float] | None:
    """The cached accuracies, with the cached weights loaded into net, when meta.json holds this
    identity; None when it holds another (an older recipe or other shards: train anew). A cache
    that cannot be read is an error, not a reason to retrain quietly: it names the file and what
    to do. meta.json is written after the weights, so a meta.json without weights is damage too."""
    def corrupt(why: str) -> DataError:
        return DataError(f"feature classifier cache {meta.parent} is corrupt ({why}): delete that "
                         "directory to train the classifier again")

    try:
        cached = json.loads(meta.read_text())
        same = cached["identity"] == identity
        accuracy = {k: float(v) for k, v in cached["accuracy"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise corrupt(f"{meta.name}: {type(e).__name__} {e}".strip()) from None
    if not same:
        return None
    if not weights.is_file():
        raise corrupt(f"{weights.name} is missing")
    try:
        net.load_state_dict(load_file(str(weights)))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise corrupt(f"{weights.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return accuracy


def feature_classifier(data_dir: str | Path, cache_dir: Path, steps: int, batch_size: int = CLASSIFIER_BATCH,
                       progress: bool = False, device: str = "cpu") -> tuple[FeatureNet, dict[str, Any]]:
    """The FeatureNet of a data set and what is known of it ({test_accuracy, val_accuracy (where
    there is a validation split), trained (here, now), cache}).

    Loaded from `cache_dir` when it was trained there for the same training shards and recipe,
    else trained with Adam for `steps` batches of grey training images (a fresh permutation of
    the split each epoch) on a one-cycle schedule (peak CLASSIFIER_LR), seed CLASSIFIER_SEED, its accuracies measured on the whole test and
    validation splits, and saved there (model.safetensors, then meta.json, each written whole:
    two evaluations sharing the cache never read half a file).
    """
    manifest = Manifest.load(data_dir)
    c, h, w = manifest.image_shape
    shards = hashlib.sha256("".join(e["sha256"] for e in manifest.shards("train")).encode()).hexdigest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CLASSIFIER_SEED)
        net = FeatureNet(c, manifest.n_classes, h, w)
    identity = {"dataset": manifest.dataset, "train_shards_sha256": shards, "steps": steps,
                "seed": CLASSIFIER_SEED, "batch_size": batch_size, "lr": CLASSIFIER_LR,
                "feature_dim": FEATURE_DIM, "image_shape": [c, h, w], "n_classes": manifest.n_classes,
                "arch": " ".join(str(net).split())}
    meta, weights = cache_dir / "meta.json", cache_dir / "model.safetensors"
    if meta.is_file():
        cached = _read_cache(meta, weights, identity, net)
        if cached is not None:
            return net.to(device).eval(), {**cached, "trained": False, "cache": str(cache_dir)}
    net = net.to(device).train()
    opt = build_adam(net.parameters(), CLASSIFIER_LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, CLASSIFIER_LR, total_steps=steps, pct_start=0.15)
    # The training split as uint8 in memory (43 MB for Fashion-MNIST): reading the shards once
    # instead of once per epoch; a fresh permutation per epoch.
    images, labels, _ = load_arrays(data_dir, "train")
    images = torch.from_numpy(images)
    labels = torch.from_numpy(labels)
    if labels.dim() == 2:  # MultiMNIST's (N, 2) class ids -> multi-hot (N, n_classes)
        labels = F.one_hot(labels, manifest.n_classes).amax(1)
    g = torch.Generator().manual_seed(CLASSIFIER_SEED)
    per_epoch = max(1, len(images) // batch_size)
    for step in console.track(range(steps), "feature classifier", enabled=progress):
        if step % per_epoch == 0:
            order = torch.randperm(len(images), generator=g)
        idx = order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
        logits, y = net(images[idx].to(device).float().div_(255)), labels[idx].to(device)
        # integer labels (B,): cross-entropy; multi-hot (B, K): per-class binary cross-entropy
        loss = (F.cross_entropy(logits, y) if y.dim() == 1
                else F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    acc = {"test_accuracy": split_accuracy(net, data_dir, "test")}
    if "val" in manifest.splits():
        acc["val_accuracy"] = split_accuracy(net, data_dir, "val")
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(weights, save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}))
    atomic_write(meta, json.dumps({"identity": identity, "accuracy": acc}, indent=1) + "\n")
    return net, {**acc, "trained": True, "cache": str(cache_dir)}


@torch.no_grad()
def features(net: FeatureNet, images: Tensor, batch_size: int = 512) -> Tensor:
    """(N, C, H, W) -> (N, FEATURE_DIM) float64, in batches."""
    dev = next(net.parameters()).device
    return torch.cat([net.body(images[i:i + batch_size].to(dev)).double().cpu()
                      for i in range(0, len(images), batch_size)])


def class_histogram(gen_logits: Tensor, test_logits: Tensor, names: list[str]) -> dict[str, Any]:
    """The classifier's class shares of the samples against those of the test images (both by
    argmax, so that the classifier's own confusions weigh on both alike).

    class_kl = KL(p_samples || p_test) in nats: finite even where the samples miss a class (which
    the rarest share shows instead); 0 when the shares agree.
    """
    k = len(names)
    p = torch.bincount(gen_logits.argmax(1), minlength=k).double() / len(gen_logits)
    q = torch.bincount(test_logits.argmax(1), minlength=k).double() / len(test_logits)
    kl = torch.where(p > 0, p * (p / q.clamp_min(1e-12)).log(), torch.zeros_like(p)).sum().item()
    rare = int(p.argmin())
    return {"class_shares": p.tolist(), "class_shares_test": q.tolist(), "class_names": list(names),
            "class_kl": kl, "class_min_share": p[rare].item(), "class_rarest": names[rare]}


# ---------------------------------------------------------------- classifier two-sample test
class TwoSampleNet(nn.Module):
    """The two-sample test's classifier: (B, C, H, W) -> conv 3x3 (16) -> ReLU -> max-pool 2 ->
    conv 3x3 (32) -> ReLU -> max-pool 2 -> linear (1): the logit of "the first set"."""

    def __init__(self, in_channels: int, height: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, 0]


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion k / n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return mid - half, mid + half


def two_sample_test(a: Tensor, b: Tensor, seed: int = 0, epochs: int = C2ST_EPOCHS, batch_size: int = 64,
                    device: str = "cpu") -> dict[str, float | int]:
    """Lopez-Paz & Oquab (2017)'s classifier two-sample test of a (N, C, H, W) against b (N', C, H, W).

    Each set is shuffled (seed) and halved; TwoSampleNet learns a against b on the first halves
    (Adam, lr 1e-3, `epochs` epochs and at least C2ST_MIN_STEPS steps) and is scored on the second halves, balanced to the smaller
    set. Returns acc (held-out accuracy: 0.5 when the sets cannot be told apart, 1 when they always
    can), acc_low / acc_high (its 95% Wilson interval) and n (held-out images).
    """
    g = torch.Generator().manual_seed(seed)
    n = min(len(a), len(b))
    a, b = a[torch.randperm(len(a), generator=g)[:n]], b[torch.randperm(len(b), generator=g)[:n]]
    half = n // 2
    if half < 1 or n - half < 1:
        raise ValueError("the two-sample test needs at least two images in each set")
    x_train = torch.cat([a[:half], b[:half]]).float()
    y_train = torch.cat([torch.ones(half), torch.zeros(half)])
    x_test = torch.cat([a[half:], b[half:]]).float()
    y_test = torch.cat([torch.ones(n - half), torch.zeros(n - half)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TwoSampleNet(*a.shape[1:]).to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    # A small set gets more epochs: too few steps would leave the classifier unable to see even a
    # plain difference (held-out accuracy stays valid either way, only the test's power drops).
    epochs = max(epochs, math.ceil(C2ST_MIN_STEPS / math.ceil(len(x_train) / batch_size)))
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.binary_cross_entropy_with_logits(net(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x_test[i:i + 512].to(device)).cpu() > 0 for i in range(0, len(x_test), 512)])
    right = int((pred == (y_test > 0.5)).sum())
    lo, hi = wilson_interval(right, len(y_test))
    return {"acc": right / len(y_test), "acc_low": lo, "acc_high": hi, "n": len(y_test)}
