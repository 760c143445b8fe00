"""The GPU check (launch/gpu_check.sh): correctness first, then the benchmark table, in minutes.

    python -m rcn_dist.bench.gpu_check --device cuda --out DIR   # an H100/H200 machine
    python -m rcn_dist.bench.gpu_check --device cpu --out DIR    # the dry run (tiny sizes, gloo)

Writes DIR/checks.jsonl (fast_fp32, bf16, fp16_scaled, zero2, zero3: each check's tolerance is in
docs/performance.md), DIR/bench.jsonl and DIR/bench.md. Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rcn_dist.bench import CapsNetSabour, Options, bench_capsnet, bench_rcn, rcn_inputs, rcn_step, train_step
from rcn_dist.parallel import collectives


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _losses(name: str, opt: Options, batch: int, steps: int = 2) -> list[float]:
    """Losses of `steps` training steps of CapsNetSabour (name "capsnet") or of preset `name`'s RCN."""
    from rcn_dist.config import preset

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
    from rcn_dist.config import apply_overrides, preset
    from rcn_dist.loop import LossModule
    from rcn_dist.model import RCN
    from rcn_dist.parallel import engine as eng

    precision = "bf16" if dev.type == "cuda" else "fp32"
    cfg = apply_overrides(preset(preset_name), [f"train.batch_size={batch}", f"train.precision={precision}",
                                                f"parallel.zero_stage={stage}", "train.warmup_steps=0"])
    eng.resolve_engine_settings(cfg, {}, 1, dev.type)
    if not torch.distributed.is_initialized():
        from rcn_dist.parallel.env import detect, init_process_group

        init_process_group(detect({}, cuda=dev.type == "cuda"), deepspeed=True)  # one process
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


def bench_rows(dev: torch.device, dry_run: bool) -> list[dict[str, Any]]:
    """The benchmark table's rows. The dry run uses batch 2 and one step of each, and leaves out
    rcn-mnist (84 GFLOP per training image: a minute on a CPU)."""
    steps, warmup = (1, 0) if dry_run else (20, 5)
    rows = [bench_capsnet(batch, steps, warmup, Options(dev, precision))
            for batch in ((2,) if dry_run else (128, 512)) for precision in ("fp32", "bf16")]
    steps, warmup = (1, 0) if dry_run else (5, 2)
    rcn = (("rcn-small", 2),) if dry_run else (("rcn-small", 256), ("rcn-mnist", 64))
    return rows + [bench_rcn(workload, batch, steps, warmup, Options(dev, precision))
                   for workload, batch in rcn for precision in ("fp32", "bf16")]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | batch | precision | img/s | ms/step | TFLOP/s | peak TFLOP/s | fraction | peak mem GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['batch']} | {r['precision']} | {r['img_per_s']:.1f} | "
              f"{r['ms_per_step']:.1f} | {r['achieved_tflops']:.3f} | {r['matmul_peak_tflops']:.1f} | "
              f"{100 * r['fraction_of_peak']:.1f}% | {r['peak_mem_bytes'] / 2**30:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def run_checks(dev: torch.device, out: Path, dry_run: bool) -> bool:
    """All checks, then the benchmark table; True if every check passed."""
    out.mkdir(parents=True, exist_ok=True)
    preset_name, batch = ("tiny", 4) if dry_run else ("small", 16)
    ok = True
    if dev.type == "cuda":
        print(json.dumps({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                          "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")}))
        # Equality checks compare true fp32 arithmetic.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    checks = {"fast_fp32": check_fast_fp32, "bf16": check_bf16, "fp16_scaled": check_fp16_scaled,
              "zero2": partial(check_zero, stage=2), "zero3": partial(check_zero, stage=3)}
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
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = bench_rows(dev, dry_run)
    for r in rows:
        print(json.dumps(r))
    (out / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "bench.md").write_text(table(rows))
    print(table(rows))
    collectives.destroy()
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default="gpu_check_out", help="directory for checks.jsonl, bench.jsonl, bench.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (implied by --device cpu)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")  # exit status 2
    ok = run_checks(torch.device(args.device), Path(args.out), args.dry_run or args.device == "cpu")
    print("gpu_check: all checks passed" if ok else "gpu_check: SOME CHECKS FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
