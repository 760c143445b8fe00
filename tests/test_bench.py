"""`rcn bench`: every workload prints one JSON line of finite numbers on CPU with tiny settings;
the FLOP counter against a hand count; the GPU check's CPU dry run."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PY, REPO, cli_env, run

from rcn_dist import bench
from rcn_dist.cli import main as cli_main
from rcn_dist.config import preset
from rcn_dist.flops import rcn_flops

FAST = ["--steps", "1", "--warmup", "0"]


def _bench(capsys, *args: str) -> dict:
    assert bench.main(list(args)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    _assert_finite(result)
    return result


def _assert_finite(obj) -> None:
    if isinstance(obj, float):
        assert math.isfinite(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _assert_finite(v)
    elif isinstance(obj, list):
        for v in obj:
            _assert_finite(v)


def _check_step_result(r: dict, batch: int) -> None:
    assert r["batch"] == batch and r["img_per_s"] > 0 and r["ms_per_step"] > 0
    assert r["peak_mem_bytes"] > 0 and r["matmul_peak_tflops"] > 0
    assert r["achieved_tflops"] == pytest.approx(r["flops_per_image"] * r["img_per_s"] / 1e12)
    assert r["fraction_of_peak"] == pytest.approx(r["achieved_tflops"] / r["matmul_peak_tflops"])


def test_flops_of_tiny_match_a_hand_count():
    c = preset("tiny").model  # 28x28x1; T=4; see config._tiny for the sizes used below
    T = 4
    enc_conv = 2 * 1 * 25 * 16 * 24 * 24 + 2 * 16 * 25 * 16 * 20 * 20  # 5x5 convs 1->16->16
    enc_primary = 2 * 16 * 81 * (4 * 4) * 6 * 6  # 9x9 stride 2 on 20x20 -> 6x6, 4 types x 4-D
    enc_routing = 2 * 144 * 10 * 8 * 4 + 2 * 10 * 144 * 8 * (2 * 3 - 1)  # W u, then 5 passes
    dec_deconv = 2 * 4 * 8 * 25 * 4 * 4 + 2 * 8 * 16 * 25 * 8 * 8  # 4x4 seed -> 8x8 -> 12x12
    dec_primary = 2 * 16 * 25 * 16 * 4 * 4  # 5x5 stride 2 on 12x12 -> 4x4
    dec_routing = 2 * 64 * 4 * 8 * 4 + 2 * 4 * 64 * 8 * 5
    read = 2 * 1 * (2 * 3 * 28 * 28 + 2 * 3 * 28 * 3)  # x and x_hat, 3x3 window
    write = 1 * (2 * 28 * 3 * 3 + 2 * 28 * 3 * 28)
    lstm_enc = 2 * ((80 + 18 + 32) + 32) * 4 * 32  # input: class caps 10x8, glimpse 2x3x3, h_dec
    lstm_dec = 2 * (32 + 32) * 4 * 32  # input: the 4x8 capsules only (the strict reading), h_dec
    linear = (2 * 32 * 5 + 2 * 32 * 16) + (2 * 32 * 5 + 2 * 32 * 9) + 2 * 8 * 64  # latent, windows,
    # patch, seed map
    f = rcn_flops(c)
    assert f["conv"] == enc_conv + enc_primary + T * dec_primary
    assert f["deconv"] == T * dec_deconv
    assert f["routing"] == enc_routing + T * dec_routing
    assert f["filterbank"] == T * (read + write)
    assert f["rnn"] == T * (lstm_enc + lstm_dec)
    assert f["linear"] == T * linear
    assert f["total"] == sum(v for k, v in f.items() if k != "total")


def test_capsnet_flops_are_the_sabour_count():
    fwd = (2 * 1 * 81 * 256 * 20 * 20 + 2 * 256 * 81 * 256 * 6 * 6  # conv1, primary caps
           + 2 * 1152 * 10 * 16 * 8 + 2 * 10 * 1152 * 16 * 5  # predictions, 3 routings
           + 2 * (160 * 512 + 512 * 1024 + 1024 * 784))  # reconstruction MLP
    assert bench.capsnet_flops() == 3 * fwd


@pytest.mark.slow
def test_capsnet_sabour_alternates_with_a_comparison_driver(capsys, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import torch\nNAME = 'half-size'\n"
        "def make_step(batch, device):\n"
        "    conv = torch.nn.Conv2d(1, 8, 9).to(device)\n"
        "    x = torch.rand(batch, 1, 28, 28, device=device)\n"
        "    return lambda: conv(x).sum().backward()\n")
    r = _bench(capsys, "--workload", "capsnet-sabour", "--batch", "2", *FAST, "--compare-with", str(driver),
               "--with-eager")
    _check_step_result(r, 2)
    assert r["compare_with"] == "half-size" and r["other_img_per_s"] > 0 and r["eager_img_per_s"] > 0
    assert r["speedup_vs_other"] == pytest.approx(r["img_per_s"] / r["other_img_per_s"])


@pytest.mark.slow
def test_rcn_small_step(capsys):
    r = _bench(capsys, "--workload", "rcn-small", "--batch", "2", *FAST, "--eager")
    _check_step_result(r, 2)
    assert r["precision"] == "fp32" and not r["fast"] and r["flops_per_image"] == 3 * rcn_flops(preset("small").model)["total"]


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["rcn-mnist", "rcn-cifar10"])
def test_paper_size_step_on_cpu(capsys, workload):
    _check_step_result(_bench(capsys, "--workload", workload, "--batch", "1", *FAST), 1)


@pytest.mark.slow
def test_loader_on_a_prepared_set(capsys, fmnist_small):
    r = _bench(capsys, "--workload", "loader", "--data", str(fmnist_small), "--batch", "16", "--seconds", "0.5")
    assert r["img_per_s"] > 0 and r["steps"] >= 1


@pytest.mark.slow
def test_loader_prepares_its_own_set(capsys):
    assert bench.main(["--workload", "loader", "--seconds", "0.5"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["img_per_s"] > 0


@pytest.mark.slow
def test_pipeline_workload(capsys):
    """The benchmark runs (a failed import is a failure, not an "unavailable" pass) and reports
    the best pipeline row."""
    r = _bench(capsys, "--workload", "pipeline", "--batch", "4", "--steps", "1")
    assert r.get("available") is True, r
    pipeline_rows = [row for row in r["rows"] if row["mode"] == "pipeline"]
    assert pipeline_rows and r["img_per_s"] == max(row["img_per_s"] for row in pipeline_rows) > 0


@pytest.mark.slow
def test_data_parallel_scaling_reports_the_ceiling(capsys):
    r = _bench(capsys, "--workload", "rcn-small", "--nproc", "2", "--batch", "4", "--rounds", "1", *FAST)
    assert r["nproc"] == 2 and r["img_per_s"] > 0 and r["ceiling_img_per_s"] > 0 and r["single_img_per_s"] > 0
    assert r["fraction_of_ceiling"] == pytest.approx(r["img_per_s"] / r["ceiling_img_per_s"])
    assert r["speedup_vs_1"] == pytest.approx(r["img_per_s"] / r["single_img_per_s"])


def _quickstart_dir(tmp_path: Path, error: float) -> Path:
    d = tmp_path / "qs"
    d.mkdir()
    (d / "config.json").write_text(preset("small").to_json())
    rows = [{"step": s, "samples": 64 * s, "img_per_s": 100.0 + s, "loss": 500.0 - s} for s in (1, 2, 3)]
    rows.append({"step": 3, "kind": "eval", "test_error": error})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.json").write_text(json.dumps({"metrics": {"test_error": error, "test_elbo": 260.5}}))  # rcn eval's layout
    os.utime(d / "config.json", (1000, 1000))
    os.utime(d / "eval.json", (1000 + 900, 1000 + 900))
    return d


def test_quickstart_reads_a_run_against_its_targets(capsys, tmp_path):
    r = _bench(capsys, "--workload", "quickstart", "--run", str(_quickstart_dir(tmp_path, 0.12)))
    assert r["wall_s"] == pytest.approx(900) and r["test_error"] == 0.12 and r["test_elbo"] == 260.5
    assert r["wall_ok"] and r["error_ok"] and r["steps"] == 3 and r["img_per_s"] == 102.0
    (tmp_path / "qs").rename(tmp_path / "qs_12")
    assert not _bench(capsys, "--workload", "quickstart", "--run", str(_quickstart_dir(tmp_path, 0.135)))["error_ok"]


def test_bad_input_is_one_error_line(tmp_path, capsys):
    def error(*args) -> str:
        assert cli_main(["bench", *map(str, args)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("rcn: error: ")
        return err

    assert "--compare-with" in error("--workload", "capsnet-sabour", "--compare-with", tmp_path / "nope.py")
    assert "--nproc" in error("--workload", "capsnet-sabour", "--nproc", "2")
    assert "eval.json" in error("--workload", "quickstart", "--run", tmp_path)
    assert "--preset" in error("--workload", "rcn-small", "--preset", "tiny")
    assert "--profile-t" in error("--workload", "ops", "--profile-t", "2", "1")
    assert "unknown preset" in error("--workload", "ops", "--preset", "nope")
    assert "--precision" in error("--workload", "ops", "--precision", "bf16")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # five checks, each a short training run
def test_gpu_check_dry_run_on_cpu(fmnist_small, tmp_path):
    p = run(["bash", "launch/gpu_check.sh", "--device", "cpu", "--out", str(tmp_path), "--data", str(fmnist_small)],
            env=cli_env(RCN_PYTHON=PY), timeout=900)
    assert "gpu_check: all checks passed" in p.stdout
    checks = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    assert [c["check"] for c in checks] == ["train_resume", "engine_numerics_T64", "fast_fp32", "bf16",
                                            "fp16_scaled", "zero2", "zero3"]
    assert all(c["ok"] for c in checks), checks
    train = checks[0]  # the real command: torchrun launch/train.py --deepspeed configs/ds.json
    assert train["stopped_exit_3"] and train["resumed_exit"] == 0 and train["bit_identical_after_resume"]
    assert train["eval_reduced_exit"] == 0 and train["test_elbo"] > 0
    assert checks[1]["bf16"]["rel_err"] <= 5e-3
    assert checks[4]["skipped"]  # fp16 is a GPU-only check
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert {r["workload"] for r in rows} == {"capsnet-sabour", "rcn-small"}
    assert not [r for r in rows if "error" in r]
    sweep = [r["batch"] for r in rows if r["workload"] == "rcn-small" and "kernels_per_step" not in r]
    assert sweep == [2, 4, 8]
    variants = {r["variant"]: r for r in rows if "kernels_per_step" in r}
    assert set(variants) == {"eager", "steps"}  # no CUDA graphs on a CPU
    # Compiled steps dispatch fewer ops than eager ones (inductor fuses them).
    assert 0 < variants["steps"]["kernels_per_step"] < variants["eager"]["kernels_per_step"]
    assert (tmp_path / "bench.md").read_text().startswith("| workload |")


@pytest.mark.slow
def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run([PY, "-m", "rcn_dist.bench.gpu_check", "--device", "cuda", "--out", str(tmp_path)],
                       cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stderr


# ------------------------------------------------------------------ op counts
def _totals(counts: dict) -> dict:
    return {p: {k: v for k, v in c.items() if k != "by_name"} for p, c in counts.items()}


def test_views_and_no_op_conversions_launch_no_kernel():
    from torch.profiler import ProfilerActivity, profile

    from rcn_dist.bench.base import count_events

    a = torch.randn(3, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        a.view(12)
        a.t().reshape(12)  # a copy: the transpose is not contiguous
        a.flatten()
        a.to(torch.float32)  # already float32: returns a
        a.to(torch.float64)
        a + 1
    c = count_events(prof.events())
    assert c["aten"] == 7  # view, t, reshape, flatten, to, to, add; reshape's internals not again
    assert c["launching"] == 3  # the copying reshape, the converting to, the add
    assert c["kernels"] == c["memops"] == 0


def test_op_count_is_positive_and_deterministic():
    from rcn_dist.bench.base import PHASES, count_ops

    cfg = preset("tiny")
    first, second = count_ops(cfg, batch=2, T=2), count_ops(cfg, batch=2, T=2)
    assert first == second  # by op name too
    for p in PHASES:
        assert first[p]["aten"] >= first[p]["launching"] > 0 and first[p]["kernels"] == 0
    assert first["backward"]["aten"] > first["forward"]["aten"]


def test_ops_per_drawing_step_is_the_difference_and_extrapolates_exactly():
    from rcn_dist.bench.base import PHASES, count_ops, ops_report

    cfg = preset("tiny")
    c1, c2, cT = (_totals(count_ops(cfg, batch=2, T=t)) for t in (2, 3, cfg.model.T))
    r = ops_report(cfg, batch=2)
    assert r["T"] == cfg.model.T == 4 and r["T_profiled"] == [2, 3]
    assert r["forward_ops_per_drawing_step"] == c2["forward"]["aten"] - c1["forward"]["aten"] > 0
    assert r["backward_ops_per_drawing_step"] == c2["backward"]["aten"] - c1["backward"]["aten"] > 0
    assert r["ops_per_drawing_step"] == sum(c2[p]["aten"] - c1[p]["aten"] for p in PHASES)
    assert r["launching_ops_per_drawing_step"] == sum(c2[p]["launching"] - c1[p]["launching"] for p in PHASES)
    # the count is linear in T: once per image + T x per drawing step is the count at T = 4
    assert r["ops_per_step"] == sum(cT[p]["aten"] for p in PHASES)
    assert r["ops_per_step"] == r["ops_once_per_image"] + 4 * r["ops_per_drawing_step"]
    assert (r["forward_ops"], r["backward_ops"], r["optimizer_ops"]) == tuple(cT[p]["aten"] for p in PHASES)
    assert r["launching_ops_per_step"] == sum(cT[p]["launching"] for p in PHASES)


def test_ops_workload_prints_one_line_per_preset(capsys):
    r = _bench(capsys, "--workload", "ops", "--preset", "tiny", "--check-linear")
    assert r["workload"] == "ops" and r["preset"] == "tiny" and r["device"] == "cpu" and r["batch"] == 2
    assert r["linear"] and r["ops_per_step_measured"] == r["ops_per_step"] > r["launching_ops_per_step"] > 0
    assert r["forward_ops"] + r["backward_ops"] + r["optimizer_ops"] == r["ops_per_step"]
    assert r["launch_bound_ms_at_10us"] == pytest.approx(r["launching_ops_per_step"] * 0.01)
    assert r["launch_bound_ms_at_20us"] == pytest.approx(2 * r["launch_bound_ms_at_10us"])
    assert sum(r["top_ops_per_drawing_step"].values()) <= r["ops_per_drawing_step"]
    assert bench.OPS_PRESETS == ("small", "mnist", "cifar10")  # what a bare --workload ops counts


def test_quickstart_execute_runs_the_repositorys_script():
    """--execute runs launch/quickstart.sh of this repository (the path once pointed into the package)."""
    from rcn_dist.bench import QUICKSTART_SCRIPT

    assert QUICKSTART_SCRIPT == Path(__file__).resolve().parents[1] / "launch" / "quickstart.sh"
    assert QUICKSTART_SCRIPT.is_file()
