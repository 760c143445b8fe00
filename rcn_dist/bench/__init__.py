"""`rcn bench`: throughput of named workloads against the machine's own matmul peak.

Each workload prints one JSON line (`result`): img/s and ms per step (the median step, timed
after warm-up, with CUDA events on a GPU), peak memory, model FLOPs per image (rcn_dist.flops)
and their fraction of a matmul peak measured on the same device in the same run. The ops workload
prints one line per RCN preset instead: the operators (aten ops; CUDA kernels on a GPU) that one
training step dispatches (rcn_dist.bench.base.ops_report).
docs/performance.md has the workloads, the options and measured tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from rcn_dist import speed
from rcn_dist.bench.base import PHASES, count_ops, ops_report, rcn_inputs
from rcn_dist.config import apply_overrides, preset
from rcn_dist.data.loader import TrainStream
from rcn_dist.data.prepare import main as prepare
from rcn_dist.errors import RcnError
from rcn_dist.flops import count_forward, rcn_flops, train_flops_per_image
from rcn_dist.model import RCN, PrimaryCapsules, RoutedCapsules, margin_loss, sample_noise
from rcn_dist.model.losses import LossModule
from rcn_dist.parallel import collectives
from rcn_dist.parallel.engine import build_adam
from rcn_dist.parallel.env import detect, free_port, init_process_group

WORKLOADS = ("capsnet-sabour", "rcn-small", "rcn-mnist", "rcn-cifar10", "ops", "noise", "loader", "pipeline",
             "quickstart")
RCN_PRESETS = {"rcn-small": "small", "rcn-mnist": "mnist", "rcn-cifar10": "cifar10"}
OPS_PRESETS = ("small", "mnist", "cifar10")
"""What `--workload ops` counts without --preset."""
OPS_BATCH = 2
"""Op counts do not depend on the batch: 2 images keep a paper-size profile at T = 1, 2 to seconds on CPU."""
CPU_BATCH = {"capsnet-sabour": 128, "rcn-small": 32, "rcn-mnist": 2, "rcn-cifar10": 2, "loader": 64, "noise": 64}
"""Default batches on CPU: paper-size RCNs take ~84 GFLOP per training image, so a CPU step stays short."""
QUICKSTART_TARGETS = {"wall_s": 20 * 60, "test_error": 0.13}


class BenchError(RcnError):
    """A benchmark cannot run as asked (bad option, missing driver or run directory)."""


# ------------------------------------------------------------------ the Sabour-size CapsNet
class CapsNetSabour(nn.Module):
    """Sabour et al.'s MNIST CapsNet from our capsule layers: conv 256 9x9 -> 32x6x6 8-D primary
    capsules -> 10 16-D class capsules (3 routings) + the 512/1024/784 reconstruction MLP fed the
    class capsules masked by the label. The same work as XifengGuo/CapsNet-Pytorch's train step."""

    def __init__(self, routings: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 256, 9)
        self.primary = PrimaryCapsules(256, 32, 8, kernel=9, stride=2)
        self.digits = RoutedCapsules(32 * 6 * 6, 8, 10, 16, routings)
        self.decoder = nn.Sequential(nn.Linear(16 * 10, 512), nn.ReLU(), nn.Linear(512, 1024), nn.ReLU(),
                                     nn.Linear(1024, 784))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 1, 28, 28), y (B,) -> capsule lengths (B, 10), reconstruction logits (B, 784)."""
        v = self.digits(self.primary(torch.relu(self.conv1(x))))  # (B, 10, 16)
        mask = F.one_hot(y, 10).to(v.dtype)
        return v.norm(dim=-1), self.decoder((v * mask[:, :, None]).flatten(1))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Margin loss + 0.0005 x summed squared reconstruction error, batch mean (Sabour et al.)."""
        lengths, logits = self(x, y)
        recon = ((torch.sigmoid(logits.float()) - x.flatten(1)) ** 2).sum(dim=1)
        return (margin_loss(lengths.float(), y) + 0.0005 * recon).mean()


# ------------------------------------------------------------------ timing
@dataclass
class Options:
    """How a training step is built: the fast path and its eager reference."""

    device: torch.device
    precision: str = "fp32"
    """"fp32", "bf16" (autocast; routing and squash in fp32) or "fp16" (autocast with a GradScaler)."""
    fast: bool = True
    """What `rcn train` runs on this device (rcn_dist.speed.choose: channels-last where it pays,
    fused Adam); False: the plain eager step."""
    compile: bool = False
    """torch.compile the loss function (GPU; needs a C++ compiler on CPU and minutes)."""
    compile_steps: str = "off"
    """"off", "steps" (train.compile=steps: the RCN's drawing steps compiled) or "graphs"
    (train.cuda_graphs: and replayed as CUDA graphs; GPU only)."""

    def speed(self) -> speed.Speed:
        """The speed settings `rcn train` would run this step with."""
        return speed.choose(self.device, compile="steps" if self.compile_steps != "off" else "off",
                            cuda_graphs=self.compile_steps == "graphs")


def train_step(model: nn.Module, loss_fn: Callable[..., Tensor], inputs: tuple[Tensor, ...],
               opt: Options, lr: float = 1e-3) -> Callable[[], Tensor]:
    """One training step (zero grads, forward under the chosen precision, backward, Adam) as a
    closure over fixed inputs: what the benchmarks time and the fast == eager tests compare."""
    dev = opt.device
    settings = opt.speed()  # the choice of speed.choose, as in rcn train (its global switches: run_workload)
    fast = opt.fast and settings.channels_last
    fmt = torch.channels_last if fast else torch.preserve_format  # for the convolutions
    model.to(dev, memory_format=fmt)
    if opt.compile_steps != "off":
        speed.compile_steps(model, cuda_graphs=settings.cuda_graphs)
    inputs = tuple(t.to(dev, memory_format=fmt) if t.dim() == 4 else t.to(dev) for t in inputs)
    adam = build_adam(model.parameters(), lr, fused=opt.fast and settings.fused_adam)
    fn = torch.compile(loss_fn) if opt.compile else loss_fn
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opt.precision)
    scaler = torch.amp.GradScaler(dev.type) if opt.precision == "fp16" else None  # dynamic loss scaling

    def step() -> Tensor:
        speed.step_begins(settings)
        adam.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=half or torch.bfloat16, enabled=half is not None):
            loss = fn(*inputs)
        if scaler is None:
            loss.backward()
            adam.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(adam)
            scaler.update()
        return loss.detach()

    return step


def time_alternating(fns: dict[str, Callable[[], Any]], steps: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns call by call, so that load
    from elsewhere on the machine falls on all of them alike. CUDA events on a GPU."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, f in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                f()
                end.record()
                end.synchronize()
                out[k].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                f()
                out[k].append(time.perf_counter() - t0)
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of an n x n x n matmul (n = 8192 on a GPU, 1024 on a CPU) on this device in this
    process: the ceiling that model TFLOP/s are quoted against. The fastest of 10 (a ceiling; on a
    shared machine other processes only ever add time)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = time_alternating({"mm": lambda: a @ b}, 10, 2, device)["mm"]
    return 2 * n**3 / min(times) / 1e12


def result(name: str, device: torch.device, batch: int, steps: int, img_s: float, flops_per_image: float,
           peak_tflops: float, **extra: Any) -> dict[str, Any]:
    """The one-line result of a workload (`batch` images per step over all processes). Peak memory:
    the CUDA allocator's peak on a GPU, this process's peak resident set on a CPU. The 1-minute load
    average goes with it: timings on a shared machine are only as good as it is low."""
    achieved = flops_per_image * img_s / 1e12
    mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"workload": name, "device": str(device), "batch": batch, "steps": steps,
            "img_per_s": img_s, "ms_per_step": 1e3 * batch / img_s, "peak_mem_bytes": mem,
            "flops_per_image": flops_per_image, "achieved_tflops": achieved,
            "matmul_peak_tflops": peak_tflops, "fraction_of_peak": achieved / peak_tflops if peak_tflops else 0.0,
            "threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0], **extra}


def time_steps(name: str, fns: dict[str, Callable[[], Any]], batch: int, steps: int, warmup: int, opt: Options,
               flops_per_image: float, **extra: Any) -> dict[str, Any]:
    """`result` of the training steps `fns` timed alternately: "ours" (the median step counts), and
    when given "eager" (eager_img_per_s) and a comparison driver's "other"."""
    peak = matmul_peak(opt.device, torch.bfloat16 if opt.precision == "bf16" else torch.float32)
    times = time_alternating(fns, steps, warmup, opt.device)
    img_s = {k: batch / statistics.median(v) for k, v in times.items()}
    if "eager" in img_s:
        extra["eager_img_per_s"] = img_s["eager"]
    if "other" in img_s:
        extra |= {"other_img_per_s": img_s["other"], "speedup_vs_other": img_s["ours"] / img_s["other"]}
    return result(name, opt.device, batch, steps, img_s["ours"], flops_per_image, peak, precision=opt.precision,
                  fast=opt.fast, **extra)


# ------------------------------------------------------------------ workloads
def capsnet_flops() -> int:
    """Training FLOPs per image of CapsNetSabour, counted on the meta device."""
    with torch.device("meta"):
        model = CapsNetSabour()
        x, y = torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long)
    return train_flops_per_image(count_forward(model, lambda m: m(x, y)))


def bench_capsnet(batch: int, steps: int, warmup: int, opt: Options, compare_with: str | None = None,
                  eager_too: bool = False) -> dict[str, Any]:
    """capsnet-sabour: our layers at Sabour size; optionally alternated with a comparison driver
    (a Python file with make_step(batch, device) -> step() and NAME: another implementation's train
    step) and/or our own eager path, medians of each."""
    torch.manual_seed(0)
    x = (torch.rand(batch, 1, 28, 28) > 0.6).float()
    y = torch.randint(0, 10, (batch,))
    model = CapsNetSabour()
    fns = {"ours": train_step(model, model.loss, (x, y), opt)}
    if eager_too:
        ref = CapsNetSabour()
        fns["eager"] = train_step(ref, ref.loss, (x, y), Options(opt.device, "fp32", fast=False))
    extra: dict[str, Any] = {}
    if compare_with:
        path = Path(compare_with)
        if not path.is_file():
            raise BenchError(f"--compare-with {compare_with}: no such file")
        driver = runpy.run_path(str(path))  # the file's globals
        if not callable(driver.get("make_step")):
            raise BenchError(f"--compare-with {compare_with}: defines no make_step(batch, device)")
        extra["compare_with"] = driver.get("NAME", path.stem)
        fns["other"] = driver["make_step"](batch, str(opt.device))
    return time_steps("capsnet-sabour", fns, batch, steps, warmup, opt, capsnet_flops(), **extra)


def rcn_step(cfg, batch: int, opt: Options, seed: int = 0) -> Callable[[], Tensor]:
    """A full training step of RCN(cfg.model) on synthetic inputs."""
    torch.manual_seed(seed)
    model = RCN(cfg.model)
    return train_step(model, lambda x, y, eps: model.loss(x, y, eps)[0], rcn_inputs(cfg, batch, seed), opt,
                      lr=cfg.train.lr)


def bench_rcn(workload: str, batch: int, steps: int, warmup: int, opt: Options,
              eager_too: bool = False) -> dict[str, Any]:
    """rcn-small / rcn-mnist / rcn-cifar10: forward, backward and Adam of the preset
    (optionally alternated with the eager fp32 step)."""
    cfg = preset(RCN_PRESETS[workload])
    fns = {"ours": rcn_step(cfg, batch, opt)}
    if eager_too:
        fns["eager"] = rcn_step(cfg, batch, Options(opt.device, "fp32", fast=False))
    fwd = rcn_flops(cfg.model)
    return time_steps(workload, fns, batch, steps, warmup, opt, train_flops_per_image(fwd), preset=cfg.name,
                      forward_flops_by_kind={k: v for k, v in fwd.items() if k != "total"})


def bench_noise(batch: int, steps: int, warmup: int, opt: Options) -> dict[str, Any]:
    """noise: a step's latent noise (sample_noise, `small`'s T and z_dim, on the device) against
    the `small` training step at the same batch, timed alternately: the noise's share of a step."""
    cfg = preset("small")
    idx = torch.randperm(60_000)[:batch]
    fns = {"noise": lambda: sample_noise(idx, 1234, cfg.model.T, cfg.model.z_dim, device=opt.device),
           "step": rcn_step(cfg, batch, opt)}
    med = {k: statistics.median(v) for k, v in time_alternating(fns, steps, warmup, opt.device).items()}
    return {"workload": "noise", "device": str(opt.device), "batch": batch, "steps": steps, "preset": cfg.name,
            "noise_ms": 1e3 * med["noise"], "step_ms": 1e3 * med["step"], "noise_share_of_step": med["noise"] / med["step"],
            "threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0]}


# ------------------------------------------------------------------ data-parallel scaling
def _scaling_worker(rank: int, mode: str, world: int, port: int, batch: int, steps: int, warmup: int,
                    out_dir: str) -> None:
    """One process of a scaling phase, 1 thread. mode "ddp": DDP over gloo; "solo": no process group."""
    torch.set_num_threads(1)
    cfg = preset("small")
    torch.manual_seed(0)
    model = RCN(cfg.model)
    x, y, eps = rcn_inputs(cfg, batch, seed=rank)
    module: nn.Module = LossModule(model)  # a module's forward, so that DDP sees the whole step
    if mode == "ddp":
        init_process_group(detect({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}, cuda=False))
        module = nn.parallel.DistributedDataParallel(module)
    adam = build_adam(model.parameters(), 1e-3, fused=True)

    def step() -> None:
        adam.zero_grad(set_to_none=True)
        module(x, y, eps)["loss"].mean().backward()
        adam.step()

    times = time_alternating({"s": step}, steps, warmup, torch.device("cpu"))["s"]
    if mode == "ddp":
        collectives.destroy()
    Path(out_dir, f"{mode}{world}_{rank}.json").write_text(json.dumps(times))


def _phase(mode: str, world: int, batch: int, steps: int, warmup: int) -> float:
    """img/s of one phase: `world` processes side by side, each its own median step."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_scaling_worker, args=(mode, world, free_port(), batch, steps, warmup, tmp),
                           nprocs=world, start_method="spawn")
        per_rank = [statistics.median(json.loads(Path(tmp, f"{mode}{world}_{r}.json").read_text()))
                    for r in range(world)]
    if mode == "ddp":  # ranks wait for each other: the step is the slowest rank's
        return world * batch / max(per_rank)
    return sum(batch / t for t in per_rank)


def bench_scaling(nproc: int, batch: int, steps: int, warmup: int, rounds: int = 2) -> dict[str, Any]:
    """rcn-small data-parallel scaling on CPU: DDP on `nproc` processes (gloo, 1 thread each, batch
    per rank), against 1 process alone and the ceiling, `nproc` independent 1-process runs side by
    side. The phases take turns for `rounds` rounds; each figure is the best round's."""
    res: dict[str, list[float]] = {"single": [], "ceiling": [], "ddp": []}
    for _ in range(rounds):
        res["single"].append(_phase("solo", 1, batch, steps, warmup))
        res["ceiling"].append(_phase("solo", nproc, batch, steps, warmup))
        res["ddp"].append(_phase("ddp", nproc, batch, steps, warmup))
    single, ceiling, ddp = (max(res[k]) for k in ("single", "ceiling", "ddp"))
    flops = train_flops_per_image(rcn_flops(preset("small").model))
    peak = matmul_peak(torch.device("cpu"), torch.float32)  # this process's threads, for reference
    return result("rcn-small", torch.device("cpu"), nproc * batch, steps, ddp, flops, peak, nproc=nproc,
                  batch_per_rank=batch, single_img_per_s=single, ceiling_img_per_s=ceiling,
                  fraction_of_ceiling=ddp / ceiling, speedup_vs_1=ddp / single, ceiling_vs_1=ceiling / single,
                  rounds=res, cpus=os.cpu_count())


# ------------------------------------------------------------------ op counts
def bench_ops(presets: list[str], batch: int, device: torch.device, ts: tuple[int, int],
              check_linear: bool = False) -> list[dict[str, Any]]:
    """ops: one ops_report per preset (profiles at T = ts[0] and ts[1], extrapolated to the
    preset's T). check_linear: also profile at the preset's own T and report that count
    (ops_per_step_measured) and whether the extrapolation hit it (linear)."""
    rows = []
    for name in presets:
        cfg = preset(name)
        row = ops_report(cfg, batch, device, ts)
        if check_linear:
            measured = count_ops(cfg, batch, device)
            row["ops_per_step_measured"] = sum(measured[p]["aten"] for p in PHASES)
            row["linear"] = row["ops_per_step_measured"] == row["ops_per_step"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------ data, pipeline, quickstart
def bench_loader(data_dir: str | None, batch: int, workers: int, seconds: float) -> dict[str, Any]:
    """The data path alone: samples/s of one rank's TrainStream over `seconds`, after a first batch
    (which pays for starting the workers: startup_s). Without --data, a small Fashion-MNIST set is
    prepared into a temporary directory first."""
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            data_dir = str(Path(tmp, "fmnist"))
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the one JSON line
                prepare(["--dataset", "fashion-mnist", "--out", data_dir, "--limit", "2048",
                         "--shard-size", "256"])
        elif not Path(data_dir, "manifest.json").is_file():
            raise BenchError(f"--data {data_dir}: no manifest.json (prepare it with `rcn prepare`)")
        it = iter(TrainStream(data_dir, batch, dp_rank=0, dp_size=1, seed=0, num_workers=workers))
        t0 = time.perf_counter()
        next(it)
        t1, samples = time.perf_counter(), 0
        while time.perf_counter() - t1 < seconds:
            samples += len(next(it)["index"])
        img_s = samples / (time.perf_counter() - t1)
        it.close()
    return result("loader", torch.device("cpu"), batch, samples // batch, img_s, 0, 0.0, num_workers=workers,
                  startup_s=t1 - t0)


def bench_pipeline_workload(batch: int, steps: int) -> dict[str, Any]:
    """The 2-stage pipeline benchmark of rcn_dist.bench.pipeline on the small preset."""
    # Local: a top-level import would load it twice under `python -m rcn_dist.bench.pipeline` (runpy).
    from rcn_dist.bench.pipeline import bench_pipeline

    cfg = apply_overrides(preset("small"), [f"train.batch_size={batch}"])
    rows = bench_pipeline(cfg, ms=(1, 2), steps=steps, out=lambda line: print(line, file=sys.stderr))
    best = max((r for r in rows if r["mode"] == "pipeline"), key=lambda r: r["img_per_s"])
    flops = train_flops_per_image(rcn_flops(cfg.model))
    peak = matmul_peak(torch.device("cpu"), torch.float32)
    return result("pipeline", torch.device("cpu"), batch, steps, best["img_per_s"], flops, peak, available=True,
                  rows=rows)


QUICKSTART_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "quickstart.sh"
"""What `--workload quickstart --execute` runs: the repository's launch/quickstart.sh."""


def bench_quickstart(run_dir: str, execute: bool) -> dict[str, Any]:
    """Check a quickstart run against its targets (wall time <= 20 min, test error <= 13%).

    Reads RUN_DIR/eval.json and metrics.jsonl; wall time is the span from config.json (written
    when training starts) to eval.json (written when evaluation ends). With `execute`, runs
    launch/quickstart.sh into RUN_DIR first and times it itself.
    """
    run = Path(run_dir)
    if execute:
        t0 = time.perf_counter()
        rc = subprocess.run(["bash", str(QUICKSTART_SCRIPT), str(run)]).returncode
        wall = time.perf_counter() - t0
        if rc:
            raise BenchError(f"{QUICKSTART_SCRIPT.name} {run} exited {rc} (its output is above)")
    ev_path = run / "eval.json"
    if not ev_path.is_file():
        raise BenchError(f"{run}: no eval.json (run `bash launch/quickstart.sh {run}`, or pass --execute)")
    try:
        ev = json.loads(ev_path.read_text()).get("metrics", {})  # `rcn eval`'s layout: {"metrics": {...}, ...}
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError, AttributeError) as e:
        raise BenchError(f"{run}: cannot read the run's eval.json / metrics.jsonl: {e}") from None
    if "test_error" not in ev or "test_elbo" not in ev:
        raise BenchError(f"{ev_path}: has no test_error / test_elbo")
    if not execute:
        start = run / "config.json"
        wall = ev_path.stat().st_mtime - (start.stat().st_mtime if start.is_file() else ev_path.stat().st_mtime)
    train = [r for r in rows if r.get("kind") != "eval" and r.get("img_per_s")]
    img_s = statistics.median(r["img_per_s"] for r in train) if train else 0.0
    return {"workload": "quickstart", "run": str(run), "wall_s": wall, "test_error": ev["test_error"],
            "test_elbo": ev["test_elbo"], "steps": train[-1]["step"] if train else 0, "img_per_s": img_s,
            "targets": QUICKSTART_TARGETS, "wall_ok": wall <= QUICKSTART_TARGETS["wall_s"],
            "error_ok": ev["test_error"] <= QUICKSTART_TARGETS["test_error"]}


# ------------------------------------------------------------------ command line
def run_workload(args: argparse.Namespace) -> dict[str, Any] | list[dict[str, Any]]:
    """The result of the chosen workload: one row, or (ops) one row per preset."""
    w = args.workload
    if args.steps < 1 or args.warmup < 0:
        raise BenchError("--steps must be >= 1 and --warmup >= 0")
    if args.batch is not None and args.batch < 1:
        raise BenchError(f"--batch must be positive, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    if args.compare_with and w != "capsnet-sabour":
        raise BenchError("--compare-with applies to --workload capsnet-sabour only")
    if (args.preset or args.profile_t or args.check_linear) and w != "ops":
        raise BenchError("--preset, --profile-t and --check-linear apply to --workload ops only")
    if args.nproc:
        if w != "rcn-small" or args.device != "cpu":
            raise BenchError("--nproc measures rcn-small on CPU: use --workload rcn-small --device cpu")
        if args.nproc < 1:
            raise BenchError(f"--nproc must be positive, got {args.nproc}")
        return bench_scaling(args.nproc, args.batch or CPU_BATCH["rcn-small"], args.steps, args.warmup,
                             max(1, args.rounds))
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (CPU_BATCH.get(w, 32) if args.device == "cpu" else 128)
    if args.compile_steps == "graphs" and args.device != "cuda":
        raise BenchError("--compile-steps graphs needs --device cuda (CUDA graphs do not exist on the CPU)")
    opt = Options(torch.device(args.device), args.precision, fast=not args.eager, compile=args.compile,
                  compile_steps=args.compile_steps)
    if opt.fast:
        speed.apply(opt.speed())  # TF32 and cuDNN autotuning on a GPU, as `rcn train` sets them
    if w == "capsnet-sabour":
        return bench_capsnet(batch, args.steps, args.warmup, opt, args.compare_with, args.with_eager)
    if w in RCN_PRESETS:
        return bench_rcn(w, batch, args.steps, args.warmup, opt, args.with_eager)
    if w == "ops":
        if args.precision != "fp32" or args.compile:
            raise BenchError("--workload ops counts the fp32 eager step: --precision and --compile do not apply")
        ts = tuple(args.profile_t or (2, 3))
        if not 1 <= ts[0] < ts[1]:
            raise BenchError(f"--profile-t needs 1 <= T1 < T2, got {ts[0]} {ts[1]}")
        return bench_ops(args.preset or list(OPS_PRESETS), args.batch or OPS_BATCH, opt.device, ts,
                         args.check_linear)
    if w == "noise":
        return bench_noise(batch, args.steps, args.warmup, opt)
    if w == "loader":
        return bench_loader(args.data, batch, args.workers, args.seconds)
    if w == "pipeline":
        return bench_pipeline_workload(args.batch or 16, args.steps)
    return bench_quickstart(args.run, args.execute)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rcn bench", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True, choices=WORKLOADS)
    ap.add_argument("--batch", type=int, help="images per step (per rank with --nproc); default per workload")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--eager", action="store_true", help="the plain eager step (no channels-last, no fused Adam)")
    ap.add_argument("--with-eager", action="store_true", help="also time the eager fp32 step, alternately")
    ap.add_argument("--compile", action="store_true", help="torch.compile the loss function (GPU)")
    ap.add_argument("--compile-steps", choices=("off", "steps", "graphs"), default="off",
                    help="the RCN's drawing steps as train.compile=steps (or, 'graphs', train.cuda_graphs) runs them")
    ap.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    ap.add_argument("--nproc", type=int, default=0, help="rcn-small: data-parallel scaling over N CPU processes")
    ap.add_argument("--rounds", type=int, default=2, help="--nproc: rounds of the three phases (best counts)")
    ap.add_argument("--compare-with", metavar="DRIVER",
                    help="capsnet-sabour: a .py file with make_step(batch, device) timed alternately with ours")
    ap.add_argument("--preset", action="append",
                    help=f"ops: an RCN preset to count (repeatable; default {', '.join(OPS_PRESETS)})")
    ap.add_argument("--profile-t", type=int, nargs=2, metavar=("T1", "T2"),
                    help="ops: the two numbers of drawing steps profiled (default 2 3)")
    ap.add_argument("--check-linear", action="store_true",
                    help="ops: also profile at the preset's own T and compare with the extrapolation")
    ap.add_argument("--data", help="loader: a prepared data directory (default: a small temporary one)")
    ap.add_argument("--workers", type=int, default=0, help="loader: DataLoader workers")
    ap.add_argument("--seconds", type=float, default=5.0, help="loader: seconds to read")
    ap.add_argument("--run", default="runs/quickstart", help="quickstart: the run directory")
    ap.add_argument("--execute", action="store_true", help="quickstart: run launch/quickstart.sh first")
    res = run_workload(ap.parse_args(argv))
    rows = res if isinstance(res, list) else [res]
    for row in rows:
        print(json.dumps(row, sort_keys=True), flush=True)
    try:
        json.dumps(rows, allow_nan=False)  # a NaN or infinity anywhere: exit status 1
    except ValueError:
        return 1
    return 0
