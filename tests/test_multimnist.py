"""MultiMNIST end to end: overlapping pairs (36x36, multi-hot labels) -> training -> two-object
accuracy from `rcn eval`. The source digits are Fashion-MNIST (MNIST cannot be downloaded here)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import metrics, rcn

pytestmark = pytest.mark.slow


def two_object_hits(run_dir, data) -> tuple[int, int]:
    """(images whose k longest class capsules are exactly their k labelled classes, images), from
    the saved weights and the test shards, without rcn eval's metric code."""
    from rcn_dist.data.loader import EvalStream
    from rcn_dist.parallel.checkpoint import load_model

    _, model, _ = load_model(run_dir)
    hits = n = 0
    with torch.no_grad():
        for batch in EvalStream(data, 32, 0, 1, binarize="none"):
            lengths = model(batch["image"]).class_lengths
            for length, label, valid in zip(lengths, batch["label"], batch["mask"]):
                if not valid:
                    continue
                want = set(torch.nonzero(label).flatten().tolist())
                assert 1 <= len(want) <= 2, label
                got = set(torch.topk(length, len(want)).indices.tolist())
                hits += got == want
                n += 1
    return hits, n


def test_tiny_multimnist_run_trains_and_reports_two_object_accuracy(tmp_path):
    data, run_dir = tmp_path / "mm", tmp_path / "run"
    rcn("prepare", "--dataset", "multimnist", "--out", data, "--limit", "128", "--shard-size", "32")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["image_shape"] == [1, 36, 36] and manifest["label_kind"] == "multi"
    # Grey-level test images (no binarisation draw), so that the check below reads the same pixels.
    rcn("train", "--preset", "tiny", "--data", data, "--out", run_dir, "--steps", "3", "model.height=36",
        "model.width=36", "train.eval_every=0", "data.binarize=none")
    assert all(math.isfinite(r["loss"]) for r in metrics(run_dir))
    rcn("eval", "--run", run_dir, "--parts", "test,iw", "--iw", "2")
    m = json.loads((run_dir / "eval.json").read_text())["metrics"]
    assert m["test_n"] == 128
    hits, n = two_object_hits(run_dir, data)
    assert n == 128
    assert m["two_object_accuracy"] == pytest.approx(hits / n, abs=1e-12)
    loop = metrics(run_dir, "eval")[-1]
    assert m["test_elbo"] == pytest.approx(loop["test_elbo"], rel=1e-6)
    assert math.isfinite(m["iw_nll"]) and m["iw_nll"] <= m["iw_elbo_mc"]
