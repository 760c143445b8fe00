"""Metric loggers: metrics.jsonl always, TensorBoard as an optional extra, W&B only where installed."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import metrics, rcn

from rcn_dist.config import ConfigError, apply_overrides, preset
from rcn_dist.loggers import logger_names, make_loggers

HAVE_TB = importlib.util.find_spec("tensorboard") is not None
ROWS = [{"step": 1, "loss": 3.5, "lr": 0.1, "samples": 16},
        {"step": 2, "loss": 2.5, "lr": 0.1, "samples": 32},
        {"step": 2, "kind": "eval", "full": True, "test_elbo": 7.25, "test_error": 0.5}]


def tb_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def cfg_with(loggers: str):
    return apply_overrides(preset("tiny"), [f"train.loggers={loggers}"])


def test_jsonl_is_always_first_and_unknown_names_are_refused():
    assert logger_names(cfg_with("tensorboard")) == ["jsonl", "tensorboard"]
    assert logger_names(cfg_with("wandb,jsonl,wandb")) == ["jsonl", "wandb"]
    with pytest.raises(ConfigError, match="train.loggers: unknown logger.*mlflow"):
        cfg_with("jsonl,mlflow")


def test_jsonl_rows_on_rank_0_only(tmp_path):
    lg = make_loggers(cfg_with("jsonl"), tmp_path / "r1", rank=1)
    for row in ROWS:
        lg.log(row)
    lg.close()
    assert not (tmp_path / "r1").exists()
    lg = make_loggers(cfg_with("jsonl"), tmp_path / "r0", rank=0)
    for row in ROWS:
        lg.log(row)
    lg.close()
    assert [json.loads(s) for s in (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()] == ROWS


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_missing_package_is_one_clear_line(name, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    with pytest.raises(ConfigError) as e:
        make_loggers(cfg_with(f"jsonl,{name}"), tmp_path, rank=3)  # every rank checks, not only 0
    assert str(e.value) == (f"train.loggers asks for {name}, but the {name} package is not installed: "
                            f"pip install 'rcn_dist[{name}]'")


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    assert HAVE_TB, "tensorboard is not installed (launch/setup.sh --test installs rcn_dist[dev])"
    lg = make_loggers(cfg_with("jsonl,tensorboard"), tmp_path, rank=0)
    for row in ROWS:
        lg.log(row)
    lg.close()
    s = tb_scalars(tmp_path / "tensorboard")
    assert s["train/loss"] == [(1, 3.5), (2, 2.5)] and s["train/samples"] == [(1, 16.0), (2, 32.0)]
    assert s["eval/test_elbo"] == [(2, 7.25)] and "eval/full" not in s and "eval/kind" not in s
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_training_writes_tensorboard_beside_jsonl(fmnist_small, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", fmnist_small, "--out", out, "--steps", "2",
            "train.eval_every=0", "train.ckpt_every=0", "train.loggers=jsonl,tensorboard"]
    if not HAVE_TB:
        p = rcn(*args, check=False)
        assert p.returncode == 2 and "the tensorboard package is not installed" in p.stderr
        return
    rcn(*args)
    losses = {r["step"]: r["loss"] for r in metrics(out)}
    s = tb_scalars(out / "tensorboard")
    assert [st for st, _ in s["train/loss"]] == [1, 2]
    assert all(v == pytest.approx(losses[st], rel=1e-6) for st, v in s["train/loss"])
    assert [st for st, _ in s["eval/test_elbo"]] == [2]
