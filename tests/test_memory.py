"""The memory estimate: its parts, its accuracy against a real step, and the refusal before start-up."""

from __future__ import annotations

import collections
import time

import pytest
import torch
from conftest import PY, cli_env, rcn, run

from rcn_dist import memory
from rcn_dist.config import ConfigError, apply_overrides, preset
from rcn_dist.memory import activation_elements, check_fits, estimate
from rcn_dist.model import RCN, Decoder, describe
from rcn_dist.parallel.env import detect

# A fresh process: load every kernel once on the tiny model (library start-up is not training
# memory), reset the peak RSS (VmHWM) to the current RSS, then build the paper-size model and run
# two forward + backward + Adam steps (the second with Adam's state allocated). The peak RSS
# increase is the measured memory of training at that micro-batch.
MEASURE = """
import re, sys, torch
from rcn_dist.config import preset
from rcn_dist.model import RCN

def status(key):
    return int(re.search(rf"^{key}:\\s+(\\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024

def steps(cfg, b, n):
    torch.manual_seed(0)
    m = RCN(cfg.model)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x = torch.rand(b, cfg.model.in_channels, cfg.model.height, cfg.model.width).round()
    y = torch.randint(0, cfg.model.n_classes, (b,))
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        m.loss(x, y)[0].backward()
        opt.step()

torch.set_num_threads(1)
steps(preset("tiny"), 2, 1)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
steps(preset(sys.argv[1]), int(sys.argv[2]), 2)
print(status("VmHWM") - base)
"""


def saved_elements(cfg, batch: int = 2) -> float:
    """Elements per image that autograd saves for backward in a real forward (distinct storages,
    parameters excluded), seen through saved_tensors_hooks."""
    model = RCN(cfg.model)
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes = collections.Counter()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            sizes["bytes"] += s.nbytes()
        return t

    m = cfg.model
    x = torch.rand(batch, m.in_channels, m.height, m.width).round()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(x, torch.randint(0, m.n_classes, (batch,)))
    return sizes["bytes"] / 4 / batch


@pytest.mark.parametrize("name,overrides", [
    ("tiny", []), ("small", []), ("mnist", ["model.T=3"]), ("cifar10", ["model.T=2"]),
    ("mnist", ["model.T=2", "model.rnn=gru", "model.read_attn=false", "model.write_attn=false"]),
])
def test_activation_count_matches_autograd(name, overrides):
    """The per-layer count from config sizes equals what autograd really keeps, within 5%."""
    cfg = apply_overrides(preset(name), overrides)
    n = activation_elements(cfg.model)
    counted = n["encoder"] + n["decoder"] + n["loop"]
    assert counted == pytest.approx(saved_elements(cfg), rel=0.05)


@pytest.mark.parametrize("overrides", [
    ["model.enc_read=off"], ["model.likelihood=logistic", "data.binarize=none"], ["model.rnn=gru"],
    ["model.dec_z_skip=true"],
])
def test_meta_trace_equals_what_autograd_keeps_on_cpu(overrides):
    """The estimate's activations come from a trace on the meta device: the same bytes, to the
    rounding of each part, as autograd saves in a real forward on CPU."""
    cfg = apply_overrides(preset("tiny"), overrides)
    n = activation_elements(cfg.model)
    assert n["encoder"] + n["decoder"] + n["loop"] == pytest.approx(saved_elements(cfg), abs=2)


def test_estimate_follows_a_model_change(monkeypatch):
    """A change to the model that the config does not show (here each decoder step also keeps
    exp(z_t), (B, z_dim), for its backward) moves the estimate by exactly what it saves: a
    hand count from the config's sizes would not have moved."""
    cfg = preset("tiny")
    m, mb = cfg.model, 8
    before = estimate(cfg, mb, 0, 1, "fp32")
    step = Decoder.step

    def keeps_more(self, z, state, canvas_prev):
        state, canvas, win = step(self, z, state, canvas_prev)
        return state, canvas + torch.exp(z).sum(1).view(-1, 1, 1, 1), win  # exp saves its output

    monkeypatch.setattr(Decoder, "step", keeps_more)
    monkeypatch.setattr(memory, "_CACHE", {})  # the trace is cached per config, which did not change
    after = estimate(cfg, mb, 0, 1, "fp32")
    assert after["activations"] - before["activations"] == 4 * mb * m.T * m.z_dim
    n = activation_elements(m)
    assert n["encoder"] + n["decoder"] + n["loop"] == pytest.approx(saved_elements(cfg), abs=2)


def test_meta_trace_of_the_paper_sizes_takes_seconds(monkeypatch):
    monkeypatch.setattr(memory, "_CACHE", {})
    for name in ("mnist", "cifar10"):
        t0 = time.perf_counter()
        estimate(preset(name), 4, 0, 1, "fp32")
        assert time.perf_counter() - t0 < 30, name


def test_parts_follow_zero_and_precision():
    cfg = preset("mnist")
    psi = describe(cfg.model)["params"]
    assert psi == sum(p.numel() for p in RCN(cfg.model).parameters())
    z0 = estimate(cfg, 4, 0, 4, "fp32")
    assert (z0["params"], z0["grads"], z0["optimizer"]) == (4 * psi, 4 * psi, 8 * psi)
    z1, z2, z3 = (estimate(cfg, 4, s, 4, "bf16") for s in (1, 2, 3))
    assert (z1["params"], z1["grads"], z1["optimizer"]) == (2 * psi, 2 * psi, 3 * psi)
    assert (z2["grads"], z3["params"]) == (psi // 2, psi // 2)
    assert z3["activations"] * 2 == z0["activations"]  # bf16 activations: half the bytes
    assert z0["total"] == sum(z0[k] for k in ("params", "grads", "optimizer", "activations", "workspace"))
    # The decoder's u_hat over T steps, if it were kept, is tens of MiB per image at paper size.
    assert z0["u_hat_all_steps"] == 4 * 4 * cfg.model.T * 512 * 10 * 16
    # A two-stage pipeline holds one stack: less than the whole model.
    pp = apply_overrides(cfg, ["parallel.pipeline_stages=2"])
    assert estimate(pp, 4, 0, 1, "fp32")["total"] < estimate(cfg, 4, 0, 1, "fp32")["total"]


def test_check_fits_names_the_largest_micro_batch():
    cfg = apply_overrides(preset("tiny"), ["train.batch_size=64", "train.micro_batch=64",
                                            "train.precision=fp32", "parallel.zero_stage=0"])
    le = detect({}, cuda=False)
    budget = estimate(cfg, 8, 0, 1, "fp32")["total"] + 10
    assert check_fits(cfg, le, 10 * estimate(cfg, 64, 0, 1, "fp32")["total"])["total"] > 0
    with pytest.raises(ConfigError, match=r"largest micro-batch that fits is 8 .*grad_accum >= 8"):
        check_fits(cfg, le, budget)
    with pytest.raises(ConfigError, match="not even micro-batch 1 fits"):
        check_fits(cfg, le, estimate(cfg, 1, 0, 1, "fp32")["params"])


@pytest.mark.slow
@pytest.mark.parametrize("batch", [4])
def test_estimate_within_30_percent_of_measured_peak(batch):
    measured = int(run([PY, "-c", MEASURE, "mnist", str(batch)], env=cli_env()).stdout.split()[-1])
    est = estimate(preset("mnist"), batch, 0, 1, "fp32")["total"]
    assert abs(est - measured) <= 0.3 * measured, (est / 2**20, measured / 2**20)


def test_train_refuses_what_cannot_fit(tmp_path):
    """A million images per micro-batch: refused in one line before any data or process group."""
    out = tmp_path / "run"
    p = rcn("train", "--preset", "tiny", "--data", tmp_path / "no-data-needed", "--out", out,
            "train.batch_size=1000000", check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("rcn: error: memory estimate"), p.stderr
    assert "largest micro-batch that fits is" in p.stderr and not out.exists()
