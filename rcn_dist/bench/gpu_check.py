"""The GPU check (launch/gpu_check.sh): correctness first, then the benchmark table, in minutes.

    python -m rcn_dist.bench.gpu_check --device cuda --out DIR   # an H100/H200 machine
    python -m rcn_dist.bench.gpu_check --device cpu --out DIR    # the dry run (tiny sizes, gloo)

Writes DIR/checks.jsonl (train_resume: the real training command, a SIGTERM and the exact
resume, `rcn eval --reduced`; engine_numerics_T64; fast_fp32, bf16, fp16_scaled, zero2, zero3:
each check's tolerance is in docs/performance.md), DIR/bench.jsonl and DIR/bench.md (the batch
sweep, kernels per step and busy fraction, eager / compile=steps / cuda_graphs). Exit status 1 if
any check or benchmark variant failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from rcn_dist import speed
from rcn_dist.bench import (
    RCN_PRESETS,
    CapsNetSabour,
    Options,
    bench_capsnet,
    bench_rcn,
    rcn_inputs,
    rcn_step,
    time_steps,
    train_step,
)
from rcn_dist.bench.base import count_events
from rcn_dist.config import apply_overrides, preset
from rcn_dist.flops import rcn_flops, train_flops_per_image
from rcn_dist.model import RCN
from rcn_dist.model.losses import LossModule
from rcn_dist.parallel import collectives
from rcn_dist.parallel import engine as eng
from rcn_dist.parallel.env import detect, init_process_group


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _losses(name: str, opt: Options, batch: int, steps: int = 2) -> list[float]:
    """Losses of `steps` training steps of CapsNetSabour (name "capsnet") or of preset `name`'s RCN."""
    if name != "capsnet":
        step = rcn_step(preset(name), batch, opt)
    else:
        torch.manual_seed(0)
        x = (torch.rand(batch, 1, 28, 28) > 0.6).float()
        y = torch.randint(0, 10, (batch,))
        torch.manual_seed(1)
        model = CapsNetSabour()
        step = train_step(model, model.loss, (x, y), opt)
    return [float(step()) for _ in range(steps)]


def check_fast_fp32(dev: torch.device, batch: int, preset_name: str) -> dict[str, Any]:
    fast = _losses(preset_name, Options(dev, "fp32", fast=True), batch)
    eager = _losses(preset_name, Options(dev, "fp32", fast=False), batch)
    err = max(_rel(a, b) for a, b in zip(fast, eager))
    return {"check": "fast_fp32", "ok": err <= 1e-5, "max_rel_err": err, "fast": fast, "eager": eager}


def check_bf16(dev: torch.device, batch: int, preset_name: str) -> dict[str, Any]:
    rows = {}
    for key, name in (("capsnet", "capsnet"), ("rcn", preset_name)):
        bf = _losses(name, Options(dev, "bf16"), batch)
        fp = _losses(name, Options(dev, "fp32"), batch)
        rows[key] = {"bf16": bf, "fp32": fp, "rel_err": _rel(bf[0], fp[0])}
    err = max(r["rel_err"] for r in rows.values())
    return {"check": "bf16", "ok": err <= 2e-2, "max_rel_err": err, **rows}


def check_fp16_scaled(dev: torch.device, batch: int, preset_name: str, steps: int = 4) -> dict[str, Any]:
    """fp16 autocast with dynamic loss scaling (torch.amp.GradScaler), against fp32."""
    if dev.type != "cuda":
        return {"check": "fp16_scaled", "ok": True, "skipped": "fp16 needs a GPU"}
    losses = _losses(preset_name, Options(dev, "fp16", fast=False), batch, steps)
    fp32 = _losses(preset_name, Options(dev, "fp32", fast=False), batch, steps=1)[0]
    err = _rel(losses[0], fp32)
    return {"check": "fp16_scaled", "ok": all(map(math.isfinite, losses)) and err <= 5e-2, "rel_err_first": err,
            "losses": losses, "fp32_first": fp32}


def check_zero(dev: torch.device, batch: int, preset_name: str, stage: int, steps: int = 3) -> dict[str, Any]:
    """A 1-process DeepSpeed engine with ZeRO `stage`: NCCL + bf16 on a GPU, gloo + fp32 on CPU."""
    precision = "bf16" if dev.type == "cuda" else "fp32"
    cfg = apply_overrides(preset(preset_name), [f"train.batch_size={batch}", f"train.precision={precision}",
                                                f"parallel.zero_stage={stage}", "train.warmup_steps=0"])
    eng.resolve_engine_settings(cfg, {}, 1, dev.type)
    if not torch.distributed.is_initialized():
        launch = init_process_group(detect({}, cuda=dev.type == "cuda"))  # one process
        eng.init_distributed(launch.backend)  # DeepSpeed's comm layer, as the deepspeed layout's init_comm
    x, y, eps = (t.to(dev) for t in rcn_inputs(cfg, batch))
    torch.manual_seed(0)
    plain = float(RCN(cfg.model).to(dev).loss(x, y, eps)[0])
    torch.manual_seed(0)
    engine, _, _ = eng.initialize(LossModule(RCN(cfg.model)), cfg, {})
    losses = []
    for _ in range(steps):
        loss = engine(x, y, eps)["loss"].mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    err = _rel(losses[0], plain)
    # bf16 here means bf16 weights throughout (DeepSpeed's bf16 mode), cruder than autocast.
    return {"check": f"zero{stage}", "ok": all(map(math.isfinite, losses)) and err <= 5e-2, "precision": precision,
            "backend": "nccl" if dev.type == "cuda" else "gloo", "losses": losses, "plain_first": plain,
            "rel_err_first": err}


# ------------------------------------------------------------------ the training loop itself
REPO = Path(__file__).resolve().parents[2]


def _train_rows(run_dir: Path) -> dict[int, float]:
    """step -> loss of a run's metrics.jsonl (training rows only)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") != "eval"}


def check_train_resume(dev: torch.device, data: str, dry_run: bool) -> dict[str, Any]:
    """What a user runs: `torchrun --nproc_per_node 1 launch/train.py --deepspeed configs/ds.json
    --preset mnist` (ZeRO-2, bf16; on the CPU dry run the tiny preset on gloo) straight for S
    steps, and again with a SIGTERM at step K (the stop protocol: checkpoint at the step boundary,
    exit 3) and a restart that resumes; with train.deterministic the losses after K must be
    bit-identical. Then `rcn eval --reduced` on the resumed run."""
    preset_name, steps, stop = ("tiny", 6, 3) if dry_run else ("mnist", 30, 12)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(REPO / "launch" / "train.py"), "--deepspeed", str(REPO / "configs" / "ds.json"), "--preset",
           preset_name, "--data", data, "--steps", str(steps), "train.eval_every=0", f"train.ckpt_every={steps}",
           "train.deterministic=true", "train.warmup_steps=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "RCN_FAULT")}
    t0 = time.perf_counter()

    def train(run_dir: Path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, "--out", str(run_dir)], cwd=REPO, env=env | extra, capture_output=True,
                              text=True, timeout=900)

    work = Path(tempfile.mkdtemp(prefix="rcn-gpu-check-"))  # checkpoints stay out of --out
    try:
        straight, split = work / "straight", work / "split"
        a = train(straight)
        t_straight = time.perf_counter() - t0
        if a.returncode != 0:
            return {"check": "train_resume", "ok": False, "error": "straight run failed: " + a.stderr[-2000:]}
        b = train(split, RCN_FAULT=f"step:{stop}:SIGTERM")
        stopped = b.returncode != 0 and "exitcode  : 3" in b.stderr  # torchrun reports the child's 3
        c = train(split)
        la, lb = _train_rows(straight), _train_rows(split)
        exact = sorted(lb) == list(range(1, steps + 1)) and all(la[s] == lb[s] for s in range(stop + 1, steps + 1))
        # The CPU dry run's data is a few hundred test images: its eval takes the parts that run on
        # any split (the sample-quality parts train the data set's feature classifier, minutes on
        # a CPU; tests/test_eval.py covers them), with mixtures of the I_q(x; z) estimate that fit.
        small = ["--parts", "test,caps,info", "eval.mi_batch=64", "eval.mi_paths=16"] if dry_run else []
        ev = subprocess.run([sys.executable, "-m", "rcn_dist", "eval", "--run", str(split), "--reduced", *small],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        evaluated = ev.returncode == 0 and (split / "eval.json").is_file()
        metrics = json.loads((split / "eval.json").read_text())["metrics"] if evaluated else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"check": "train_resume", "ok": bool(stopped and c.returncode == 0 and "resumed from" in c.stdout
                                                and exact and evaluated),
            "preset": preset_name, "steps": steps, "stopped_at": stop, "stopped_exit_3": stopped,
            "resumed_exit": c.returncode, "bit_identical_after_resume": exact, "eval_reduced_exit": ev.returncode,
            "test_elbo": metrics.get("test_elbo"), "test_error": metrics.get("test_error"),
            "straight_run_s": t_straight, "ms_per_step_straight": 1e3 * t_straight / steps,
            "errors": (b.stderr[-800:] if not stopped else "") + (c.stderr[-800:] if c.returncode else "")
            + (ev.stderr[-800:] if not evaluated else "")}


def check_engine_numerics(dev: torch.device, batch: int, preset_name: str) -> dict[str, Any]:
    """A model held in bf16 (and fp16 on a GPU) as DeepSpeed's engines hold it, at T = 64,
    against the same weights in fp32: the negative ELBO's relative difference (<= 0.5%)."""
    cfg = apply_overrides(preset("tiny"), ["model.T=64"])
    x, y, eps = (t.to(dev) for t in rcn_inputs(cfg, 16))
    torch.manual_seed(0)
    ref = LossModule(RCN(cfg.model)).to(dev)
    with torch.no_grad():
        fp32 = float(ref(x, y, eps)["elbo"].mean())
        rows: dict[str, Any] = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if dtype == torch.float16 and dev.type != "cuda":
                continue
            half = LossModule(RCN(cfg.model)).to(dev)
            half.load_state_dict(ref.state_dict())
            elbo = float(half.to(dtype)(x, y, eps)["elbo"].mean())
            rows[name] = {"elbo": elbo, "rel_err": _rel(elbo, fp32)}
    ok = all(math.isfinite(r["elbo"]) and r["rel_err"] <= 5e-3 for r in rows.values())
    return {"check": "engine_numerics_T64", "ok": ok, "fp32_elbo": fp32, **rows}


def profile_step(step, dev: torch.device) -> dict[str, Any]:
    """One (warm) training step under torch.profiler: the kernels it launches (CUDA; on the CPU the
    top-level aten ops, their proxy) and the GPU's busy fraction, kernel time over the step's wall
    time (a launch-bound step leaves the GPU idle between its kernels)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        sync()
    wall_us = 1e6 * (time.perf_counter() - t0)
    events = prof.events()
    counts = count_events(events)
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    return {"kernels_per_step": counts["kernels"] if dev.type == "cuda" else counts["launching"],
            "aten_ops_per_step": counts["aten"], "busy_fraction": busy_us / wall_us if kernels else None}


def _timed_rcn(workload: str, batch: int, steps: int, warmup: int, opt: Options, variant: str) -> dict[str, Any]:
    """bench_rcn's row for `opt`, the first call (compilation, graph capture) timed apart, and
    the same step's profile (profile_step)."""
    cfg = preset(RCN_PRESETS[workload])
    t0 = time.perf_counter()
    step = rcn_step(cfg, batch, opt)
    step()
    if opt.device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    row = time_steps(workload, {"ours": step}, batch, steps, warmup, opt, train_flops_per_image(rcn_flops(cfg.model)),
                     preset=cfg.name)
    return row | {"variant": variant, "first_step_s": first_s} | profile_step(step, opt.device)


def bench_rows(dev: torch.device, dry_run: bool, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The benchmark table's rows: CapsNet (fp32, bf16); the RCN in bf16 at three batches (a
    launch-bound step shows as a flat ms/step); kernels per step and the busy fraction; eager
    against train.compile=steps against train.cuda_graphs (a variant that fails goes to `errors`). The dry run: tiny batches, one step,
    rcn-small instead of rcn-mnist (84 GFLOP per training image: a minute on a CPU)."""
    steps, warmup = (1, 0) if dry_run else (10, 3)
    rows = [bench_capsnet(batch, steps, warmup, Options(dev, precision)) | {"variant": "eager"}
            for batch in ((2,) if dry_run else (128,)) for precision in ("fp32", "bf16")]
    steps, warmup = (1, 0) if dry_run else (5, 2)
    workload, sweep, batch = ("rcn-small", (2, 4, 8), 4) if dry_run else ("rcn-mnist", (32, 128, 512), 128)
    rows += [bench_rcn(workload, b, steps, warmup, Options(dev, "bf16")) | {"variant": "eager"} for b in sweep]
    for variant in ("eager", "steps", "graphs"):
        if variant == "graphs" and dev.type != "cuda":
            continue  # CUDA graphs exist on a GPU only (train.cuda_graphs is refused on the CPU)
        opt = Options(dev, "bf16", compile_steps="off" if variant == "eager" else variant)
        try:
            rows.append(_timed_rcn(workload, batch, steps, warmup, opt, variant))
        except Exception as e:  # a variant that fails is a row that says so; the table still comes
            errors.append({"workload": workload, "variant": variant, "error": f"{type(e).__name__}: {e}"})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def opt(r: dict[str, Any], key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else ""

    lines = ["| workload | variant | batch | precision | img/s | ms/step | TFLOP/s | fraction of peak | "
             "kernels/step | GPU busy | first step s | peak mem GiB |", "|---" * 12 + "|"]
    lines += [f"| {r['workload']} | {r.get('variant', '')} | {r['batch']} | {r['precision']} | "
              f"{r['img_per_s']:.1f} | {r['ms_per_step']:.1f} | {r['achieved_tflops']:.3f} | "
              f"{100 * r['fraction_of_peak']:.1f}% | {opt(r, 'kernels_per_step', 'd')} | "
              f"{opt(r, 'busy_fraction', '.0%')} | {opt(r, 'first_step_s', '.1f')} | "
              f"{r['peak_mem_bytes'] / 2**30:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def run_checks(dev: torch.device, out: Path, dry_run: bool, data: str) -> bool:
    """All checks, then the benchmark table; True if every check passed. `data`: prepared
    Fashion-MNIST (or MNIST) shards for the training run."""
    out.mkdir(parents=True, exist_ok=True)
    preset_name, batch = ("tiny", 4) if dry_run else ("small", 16)
    ok = True
    if dev.type == "cuda":
        print(json.dumps({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                          "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")}))
        # Equality checks compare true fp32 arithmetic.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    checks = {"train_resume": lambda d, b, p: check_train_resume(d, data, dry_run),
              "engine_numerics_T64": check_engine_numerics, "fast_fp32": check_fast_fp32, "bf16": check_bf16,
              "fp16_scaled": check_fp16_scaled, "zero2": partial(check_zero, stage=2), "zero3": partial(check_zero, stage=3)}
    with open(out / "checks.jsonl", "w") as f:
        for name, check in checks.items():
            t0 = time.perf_counter()
            try:
                r = check(dev, batch, preset_name)
            except Exception as e:  # a check that crashes has failed; the others still run
                r = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
            r["seconds"] = time.perf_counter() - t0
            ok &= bool(r["ok"])
            f.write(json.dumps(r) + "\n")
            print(json.dumps(r))
    speed.apply(speed.choose(dev))  # the benchmark runs what `rcn train` runs: TF32, cuDNN autotuning
    errors: list[dict[str, Any]] = []
    rows = bench_rows(dev, dry_run, errors)
    for r in rows + errors:
        print(json.dumps(r))
    ok &= not errors
    (out / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + errors))
    (out / "bench.md").write_text(table(rows))
    print(table(rows))
    collectives.destroy()
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default="gpu_check_out", help="directory for checks.jsonl, bench.jsonl, bench.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (implied by --device cpu)")
    ap.add_argument("--data", default="data/fashion-mnist", help="prepared 28x28 shards for the training run")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")  # exit status 2
    if not (Path(args.data) / "manifest.json").is_file():
        ap.error(f"--data {args.data}: no prepared shards (manifest.json); run `rcn prepare --dataset fashion-mnist "
                 f"--out {args.data}` first")
    ok = run_checks(torch.device(args.device), Path(args.out), args.dry_run or args.device == "cpu",
                    str(Path(args.data).resolve()))
    print("gpu_check: all checks passed" if ok else "gpu_check: SOME CHECKS FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
