"""MultiMNIST end to end: overlapping pairs (36x36, multi-hot labels) -> training -> two-object
accuracy from `rcn eval`. The source digits are Fashion-MNIST (MNIST cannot be downloaded here)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import metrics, rcn

pytestmark = pytest.mark.slow


def test_tiny_multimnist_run_trains_and_reports_two_object_accuracy(tmp_path):
    data, run_dir = tmp_path / "mm", tmp_path / "run"
    rcn("prepare", "--dataset", "multimnist", "--out", data, "--limit", "128", "--shard-size", "32")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["image_shape"] == [1, 36, 36] and manifest["label_kind"] == "multi"
    rcn("train", "--preset", "tiny", "--data", data, "--out", run_dir, "--steps", "3", "model.height=36",
        "model.width=36", "train.eval_every=0")
    assert all(math.isfinite(r["loss"]) for r in metrics(run_dir))
    rcn("eval", "--run", run_dir, "--parts", "test,iw", "--iw", "2")
    m = json.loads((run_dir / "eval.json").read_text())["metrics"]
    assert m["test_n"] == 128 and 0.0 <= m["two_object_accuracy"] <= 1.0
    assert m["two_object_accuracy"] == pytest.approx(1.0 - m["test_error"])
    loop = metrics(run_dir, "eval")[-1]
    assert m["test_elbo"] == pytest.approx(loop["test_elbo"], rel=1e-6)
    assert math.isfinite(m["iw_nll"]) and m["iw_nll"] <= m["iw_elbo_mc"]
