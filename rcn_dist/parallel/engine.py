"""The DeepSpeed engine: one source of truth for batch sizes, precision, clipping and LR.

Our config (rcn_dist.config) owns what changes the maths: batch sizes, precision, clipping, LR
and its schedule. The DeepSpeed JSON adds engine settings (ZeRO stage and its buckets, logging,
communication). Where the JSON also names one of ours and disagrees, we refuse before any
process starts, naming both values.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from rcn_dist import testhooks
from rcn_dist.config import Config, ConfigError


def load_ds_json(path: str | Path | None) -> dict[str, Any]:
    """Parse a DeepSpeed JSON file (as data); {} when no path is given."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {p} does not exist")
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"DeepSpeed config {p} does not parse: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"DeepSpeed config {p}: the top level must be an object")
    return obj


def _number(value: Any, where: str) -> float:
    """A numeric DeepSpeed JSON value, or one clear line naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}={value!r} in the DeepSpeed JSON must be a number")
    return float(value)


def _json_precision(ds: dict[str, Any]) -> str | None:
    def on(key: str) -> bool:
        return isinstance(ds.get(key), dict) and bool(ds[key].get("enabled", False))

    if on("bf16") and on("fp16"):
        raise ConfigError("DeepSpeed config enables both bf16 and fp16")
    return "bf16" if on("bf16") else "fp16" if on("fp16") else None


def resolve_engine_settings(cfg: Config, ds: dict[str, Any], dp_size: int, device: str) -> Config:
    """Reconcile our config with the DeepSpeed JSON and the world size; refuse contradictions.

    Fills train.precision ("auto"), train.micro_batch (0) and parallel.zero_stage (-1) in place
    and returns cfg.
    """
    train, parallel = cfg.train, cfg.parallel
    src = "the DeepSpeed JSON"

    def clash(ours: str, ours_v: Any, theirs: str, theirs_v: Any) -> None:
        raise ConfigError(f"{ours}={ours_v} in the config contradicts {theirs}={theirs_v} in {src}; "
                          f"set it in one place")

    json_prec = _json_precision(ds)
    if train.precision == "auto":
        train.precision = json_prec or "fp32"
    elif json_prec is not None and json_prec != train.precision:
        clash("train.precision", train.precision, f"{json_prec}.enabled", True)
    if train.precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError("train.precision=fp16 needs a GPU (fp16 is not supported on CPU); use bf16 or fp32")
    if train.cuda_graphs and not device.startswith("cuda"):
        raise ConfigError("train.cuda_graphs=true needs a GPU (CUDA graphs do not exist on the CPU); "
                          "use train.compile=steps there")

    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization={zero!r} in {src} must be an object")
    json_stage = zero.get("stage")
    if json_stage is not None and _number(json_stage, "zero_optimization.stage") not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={json_stage!r} in {src} must be 0, 1, 2 or 3")
    if parallel.zero_stage == -1:
        parallel.zero_stage = int(json_stage or 0)
    elif json_stage is not None and int(json_stage) != parallel.zero_stage:
        clash("parallel.zero_stage", parallel.zero_stage, "zero_optimization.stage", json_stage)

    if train.micro_batch == 0:
        if train.batch_size % (train.grad_accum * dp_size):
            raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by train.grad_accum="
                              f"{train.grad_accum} x {dp_size} data-parallel ranks")
        train.micro_batch = train.batch_size // (train.grad_accum * dp_size)
    elif train.micro_batch * train.grad_accum * dp_size != train.batch_size:
        raise ConfigError(f"train.micro_batch={train.micro_batch} x train.grad_accum={train.grad_accum} x "
                          f"{dp_size} data-parallel ranks != train.batch_size={train.batch_size}")

    for key, ours, val in (
        ("train_batch_size", "train.batch_size", train.batch_size),
        ("train_micro_batch_size_per_gpu", "train.micro_batch", train.micro_batch),
        ("gradient_accumulation_steps", "train.grad_accum", train.grad_accum),
        ("gradient_clipping", "train.grad_clip", train.grad_clip),
    ):
        if key in ds and ds[key] != "auto" and _number(ds[key], key) != float(val):
            clash(ours, val, key, ds[key])
    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        lr = (opt.get("params") or {}).get("lr")
        if lr is not None and _number(lr, "optimizer.params.lr") != train.lr:
            clash("train.lr", train.lr, "optimizer.params.lr", lr)
        if str(opt.get("type", "adam")).lower() not in ("adam", "adamw"):
            raise ConfigError(f"optimizer.type={opt.get('type')} in {src}: only Adam/AdamW is supported")
    if "scheduler" in ds:
        raise ConfigError(f"'scheduler' in {src}: the LR schedule lives in the config (train.lr_schedule)")
    if (train.compile == "steps" or train.cuda_graphs) and parallel.zero_stage == 3:
        raise ConfigError("train.compile=steps with ZeRO stage 3: its parameter-gathering hooks run inside the "
                          "compiled steps; use ZeRO stage 0-2 or train.compile=off")
    return cfg


def build_ds_config(cfg: Config, ds: dict[str, Any]) -> dict[str, Any]:
    """The dict handed to deepspeed.initialize: the JSON's engine settings plus our values."""
    train = cfg.train
    out = {k: v for k, v in ds.items() if k not in ("optimizer", "bf16", "fp16")}
    out.update(
        train_batch_size=train.batch_size,
        train_micro_batch_size_per_gpu=train.micro_batch,
        gradient_accumulation_steps=train.grad_accum,
        gradient_clipping=train.grad_clip,
        steps_per_print=out.get("steps_per_print", 10**9),
        wall_clock_breakdown=out.get("wall_clock_breakdown", False),
    )
    zero = dict(ds.get("zero_optimization") or {})
    zero["stage"] = cfg.parallel.zero_stage
    if zero["stage"] == 3:
        # Needed to write consolidated weights (model.safetensors) from a ZeRO-3 run.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    out["zero_optimization"] = zero
    out["bf16"] = {"enabled": train.precision == "bf16"}
    fp16 = dict(ds.get("fp16") or {})
    fp16["enabled"] = train.precision == "fp16"
    out["fp16"] = fp16
    return out


def lr_lambda(cfg: Config):
    """LR multiplier per optimizer step: linear warm-up, then cosine to min_lr_ratio or constant."""
    train = cfg.train

    def f(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        span = max(1, train.steps - train.warmup_steps)
        frac = min(1.0, (step - train.warmup_steps) / span)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def build_adam(params, lr: float, weight_decay: float = 0.0, fused: bool | None = None,
               zero_group=None) -> torch.optim.Optimizer:
    """The Adam of every training step in rcn_dist (torch's; DeepSpeed's JIT-built kernel is not needed).

    fused: True, torch's fused kernel where the parameters' device has one (3x faster than the
    per-tensor loop on CPU for 4 M parameters); False, the per-tensor loop (the eager reference);
    None, torch's default. zero_group: shard the state over that data-parallel group (ZeRO-1).
    """
    params = list(params)
    opts: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if fused is not None:
        opts |= {"fused": True} if fused and params[0].device.type in ("cpu", "cuda") else {"foreach": False}
    if zero_group is not None:
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.Adam, process_group=zero_group, **opts)
    return torch.optim.Adam(params, **opts)


def _disable_cpu_shm_comm() -> None:
    """Keep DeepSpeed's shared-memory all-reduce op off on CPU.

    DeepSpeed JIT-builds a `deepspeed_shm_comm` op on CPU (20-45 s once per machine). With it,
    about one run in eleven under the `deepspeed` launcher ended with SIGABRT at exit after
    training had finished; with it off, none in thirty. gloo does the all-reduce instead.
    RCN_DS_SHM=1 turns it back on.
    """
    if testhooks.ds_shm_comm():
        return
    # Not `import deepspeed.comm.torch as m`: the package's `torch` attribute is torch itself.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def init_distributed(backend: str) -> None:
    """DeepSpeed's communication layer (deepspeed.comm) on this process's group: started already
    by env.init_process_group, so DeepSpeed only wraps it."""
    if backend == "gloo":
        # Say it rather than let DeepSpeed probe for a GPU and warn that it found none.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # heavy (seconds), and only after DS_ACCELERATOR is set: it reads it at import

    if backend == "gloo":
        _disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def initialize(model: torch.nn.Module, cfg: Config, ds: dict[str, Any], fused_adam: bool | None = None):
    """deepspeed.initialize with build_adam (fused_adam: as there) and our LR schedule."""
    import deepspeed  # heavy (seconds): only the layouts that build a DeepSpeed engine pay for it

    opt = build_adam([p for p in model.parameters() if p.requires_grad], cfg.train.lr, cfg.train.weight_decay,
                     fused=fused_adam)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=build_ds_config(cfg, ds),
        dist_init_required=False,
    )
    return engine, optimizer, scheduler
