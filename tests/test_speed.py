"""The speed settings (rcn_dist/speed.py): one choice for `rcn train` and `rcn bench`, what
each device gets, the refusals, and train.compile=steps against the eager model."""

from __future__ import annotations

import pytest
import torch
from conftest import rcn

from rcn_dist import speed
from rcn_dist.bench.base import rcn_inputs
from rcn_dist.config import ConfigError, apply_overrides, preset
from rcn_dist.model import RCN
from rcn_dist.parallel.engine import resolve_engine_settings


def test_a_gpu_gets_tf32_autotuning_and_channels_last_the_cpu_none_of_them():
    gpu, cpu = speed.choose("cuda:1"), speed.choose("cpu")
    assert (gpu.tf32, gpu.cudnn_benchmark, gpu.channels_last, gpu.fused_adam) == (True, True, True, True)
    assert (cpu.tf32, cpu.cudnn_benchmark, cpu.channels_last, cpu.fused_adam) == (False, False, False, True)
    det = speed.choose("cuda:0", deterministic=True)
    assert det.deterministic and not det.cudnn_benchmark
    assert speed.choose("cuda:0", cuda_graphs=True).compile == "steps"  # graphs replay the compiled steps


def test_apply_sets_the_switches_and_deterministic_mode(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        speed.apply(speed.choose("cuda:0", deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.backends.cuda.matmul.allow_tf32
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        speed.apply(speed.choose("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cuda.matmul.allow_tf32


def test_the_loop_and_the_benchmark_take_the_same_settings(monkeypatch):
    """Both go through speed.choose: the loop in setup_run (read from its source: it needs a
    process group), the benchmark's train step (seen: what choose answers is what it runs)."""
    import dataclasses
    import inspect

    from rcn_dist import bench, loop

    assert "speed.choose(" in inspect.getsource(loop.setup_run)
    asked = []
    real = speed.choose

    def choose(*args, **kwargs):
        asked.append(args)
        return dataclasses.replace(real(*args, **kwargs), channels_last=True)  # a GPU's answer

    monkeypatch.setattr(speed, "choose", choose)
    cfg = preset("tiny")
    model = RCN(cfg.model)
    step = bench.train_step(model, lambda x, y, eps: model.loss(x, y, eps)[0], rcn_inputs(cfg, 2, 0),
                            bench.Options(torch.device("cpu"), "fp32", fast=True))
    assert asked and model.encoder.capsules.primary.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(step())


def test_cuda_graphs_on_the_cpu_and_compile_with_zero3_are_refused():
    cfg = apply_overrides(preset("tiny"), ["train.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="cuda_graphs=true needs a GPU"):
        resolve_engine_settings(cfg, {}, 1, "cpu")
    cfg = apply_overrides(preset("tiny"), ["train.compile=steps", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        resolve_engine_settings(cfg, {}, 1, "cpu")
    with pytest.raises(ConfigError, match="train.compile"):
        apply_overrides(preset("tiny"), ["train.compile=graph"])


def test_rcn_train_refuses_cuda_graphs_on_the_cpu_in_one_line(fmnist_small, tmp_path):
    r = rcn("train", "--preset", "tiny", "--data", fmnist_small, "--out", tmp_path / "r", "train.cuda_graphs=true",
            check=False)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cuda_graphs=true needs a GPU" in lines[0], r.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_steps_equal_eager_within_fp32_rounding():
    """train.compile=steps: the loss and every gradient of a tiny RCN as the eager model's. One
    graph per stack serves all T steps (compiled once, no recompilation)."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    eager = RCN(cfg.model)
    compiled = RCN(cfg.model)
    compiled.load_state_dict(eager.state_dict())
    speed.compile_steps(compiled)
    x, y, eps = rcn_inputs(cfg, 8)
    for model in (eager, compiled):
        model.loss(x, y, eps)[0].backward()
    a, b = eager.loss(x, y, eps)[0], compiled.loss(x, y, eps)[0]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled.encoder._compiled_step and compiled.decoder._compiled_step
