"""What the benchmarks share (outside the package's __init__, which imports the pipeline benchmark):
synthetic RCN inputs, and the count of operators that one RCN training step dispatches.

Op counts (`count_ops`, `ops_report`): torch.profiler records one training step, each phase
(forward of `RCN.loss`, backward, fused Adam) under its own profiler.

- aten ops: the events named "aten::..." that have no "aten::" ancestor, i.e. the operators as
  dispatched from Python or by autograd (the backward's ops run under autograd's
  "evaluate_function: ...Backward0" events, which are not aten ops, so they count as top level
  too). An op's internals (aten::linear's aten::t and aten::addmm) are not counted again.
- kernel-launching aten ops: those of the aten ops whose event subtree holds any op outside
  NO_KERNEL_OPS (views, metadata and allocation). aten::reshape counts only when it copies
  (its subtree then holds aten::clone), aten::to only when it converts.
- CUDA kernels (on a GPU): the kernel events the profiler records on the device, memcpy and
  memset left out (counted apart).

Op counts depend neither on the batch nor on the pixels; they are linear in the number of
drawing steps T from T = 2 on, so two profiles at small T give the per-drawing-step count exactly
(their difference) and the count at any T (docs/performance.md, "Ops per training step"). Not
from T = 1: the first step sends no gradient into the zero canvas and state it starts from, and
nothing but the loss reads the last step's canvas, so a run of one step (first and last at once)
is not a middle step less than a run of two.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch
from torch import Tensor
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from rcn_dist.model import RCN
from rcn_dist.parallel.engine import build_adam


def rcn_inputs(cfg, batch: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic binary images, labels and latent noise: the cost does not depend on the pixels."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x = (torch.rand(batch, m.in_channels, m.height, m.width, generator=g) > 0.6).float()
    y = torch.randint(0, m.n_classes, (batch,), generator=g)
    eps = torch.randn(batch, m.T, m.z_dim, generator=g)
    return x, y, eps


# ------------------------------------------------------------------ op counts
NO_KERNEL_OPS = frozenset("aten::" + n for n in (
    # views: a new tensor header on the same storage
    "view", "_unsafe_view", "_reshape_alias", "reshape", "view_as", "expand", "expand_as", "permute",
    "as_strided", "unsqueeze", "squeeze", "select", "slice", "narrow", "t", "transpose", "numpy_T", "mT",
    "detach", "alias", "flatten", "unflatten", "chunk", "split", "split_with_sizes", "unbind", "movedim",
    "diagonal", "unfold", "_neg_view", "_conj", "resolve_conj", "resolve_neg", "lift_fresh",
    # returns its input unless it copies (the copy then shows as a child)
    "contiguous", "to",
    # allocation and metadata
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
    "result_type", "size", "stride", "dim", "is_nonzero", "_has_compatible_shallow_copy_type",
))
"""aten ops that launch no kernel themselves: views, no-op conversions, allocation, metadata."""

PHASES = ("forward", "backward", "optimizer")


def _has_aten_ancestor(ev: Any) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            return True
        p = p.cpu_parent
    return False


def _launches(ev: Any) -> bool:
    """Whether an aten op or any op under it is outside NO_KERNEL_OPS."""
    stack = [ev]
    while stack:
        e = stack.pop()
        if e.name.startswith("aten::") and e.name not in NO_KERNEL_OPS:
            return True
        stack.extend(e.cpu_children)
    return False


def count_events(events: Any) -> dict[str, Any]:
    """Counts of one profile's events (torch.profiler's `prof.events()`): "aten" (top-level aten
    ops), "launching" (those that launch a kernel), "kernels" and "memops" (CUDA kernel and
    memcpy/memset events; 0 on CPU), "by_name" (a Counter of the top-level aten ops)."""
    top = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
           and not _has_aten_ancestor(e)]
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    memops = sum(e.name.startswith(("Memcpy", "Memset")) for e in device)
    return {"aten": len(top), "launching": sum(_launches(e) for e in top), "kernels": len(device) - memops,
            "memops": memops, "by_name": Counter(e.name for e in top)}


def count_ops(cfg, batch: int = 2, device: torch.device | str = "cpu", T: int | None = None,
              seed: int = 0) -> dict[str, dict[str, Any]]:
    """Profile one fp32 training step of RCN(cfg.model) (with model.T = T when given) on `device`:
    {phase: count_events(...)} for "forward" (RCN.loss), "backward" and "optimizer" (fused Adam).

    The model code as written (no channels-last, no autocast, no compile). The profiled step is
    the second: the first also creates Adam's state (exp_avg, exp_avg_sq, step) and, on a GPU,
    initialises the cuBLAS/cuDNN handles, whose launches are not part of a training step.
    """
    dev = torch.device(device)
    if T is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, T=T))
    torch.manual_seed(seed)
    model = RCN(cfg.model).to(dev)
    x, y, eps = (t.to(dev) for t in rcn_inputs(cfg, batch, seed))
    adam = build_adam(model.parameters(), 1e-3, fused=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    holder: dict[str, Tensor] = {}

    def forward() -> None:
        holder["loss"] = model.loss(x, y, eps)[0]

    def backward() -> None:
        holder.pop("loss").backward()

    phases = {"forward": forward, "backward": backward, "optimizer": adam.step}
    for fn in phases.values():
        fn()
    adam.zero_grad(set_to_none=True)  # as every training step starts
    counts: dict[str, dict[str, Any]] = {}
    for name, fn in phases.items():
        sync()
        with profile(activities=activities) as prof:
            fn()
            sync()  # every kernel of the phase inside its profile
        counts[name] = count_events(prof.events())
    return counts


def _linear(c1: dict[str, Any], c2: dict[str, Any], t1: int, t2: int, T: int) -> tuple[dict, dict, dict]:
    """Per-drawing-step, once-per-image and at-T counts from counts at t1 < t2 drawing steps."""
    per, once, at = {}, {}, {}
    for k in ("aten", "launching", "kernels", "memops"):
        d, r = divmod(c2[k] - c1[k], t2 - t1)
        if r:  # a count that is not linear in T: the average per step, as a float
            d = (c2[k] - c1[k]) / (t2 - t1)
        per[k], once[k] = d, c1[k] - t1 * d
        at[k] = once[k] + T * d
    names = c2["by_name"] - c1["by_name"]
    per["by_name"] = Counter({n: v // (t2 - t1) if v % (t2 - t1) == 0 else v / (t2 - t1) for n, v in names.items()})
    return per, once, at


def ops_report(cfg, batch: int = 2, device: torch.device | str = "cpu", ts: tuple[int, int] = (2, 3),
               top: int = 12) -> dict[str, Any]:
    """The ops of one training step of RCN(cfg.model) at its own T, from profiles at T = ts[0]
    and ts[1] (count_ops): per drawing step (the difference per step: a middle step, as the
    default ts = (2, 3) both hold a first and a last step, which differ from the others; it leaves out what runs
    once per image: the encoder capsules, the loss, the stacking of the T steps, Adam), per
    training step at the config's T (once-per-image part + T x per drawing step), the
    forward/backward/optimizer split, and the launch-bound time of a step at 10 and 20 us per
    kernel launch: from the CUDA kernels on a GPU, from the kernel-launching aten ops (a proxy)
    on a CPU. Keys with "ops" count top-level aten ops, with "launching_ops" the kernel-launching
    ones, with "kernels" CUDA kernels (GPU only): {u}_per_step, {u}_per_drawing_step,
    {u}_once_per_image, forward_{u}, backward_{u}, optimizer_{u}, forward_{u}_per_drawing_step,
    backward_{u}_per_drawing_step."""
    dev = torch.device(device)
    t1, t2 = ts
    if not 1 <= t1 < t2:
        raise ValueError(f"ts must be 1 <= t1 < t2, got {ts}")
    T = cfg.model.T
    c1, c2 = count_ops(cfg, batch, dev, T=t1), count_ops(cfg, batch, dev, T=t2)
    lin = {p: _linear(c1[p], c2[p], t1, t2, T) for p in PHASES}  # phase -> (per step, once, at T)
    out: dict[str, Any] = {"workload": "ops", "preset": cfg.name, "device": str(dev), "batch": batch, "T": T,
                           "T_profiled": [t1, t2], "threads": torch.get_num_threads()}
    units = {"ops": "aten", "launching_ops": "launching"} | ({"kernels": "kernels"} if dev.type == "cuda" else {})
    for u, k in units.items():
        per = {p: lin[p][0][k] for p in PHASES}
        at = {p: lin[p][2][k] for p in PHASES}
        out |= {f"{u}_per_step": sum(at.values()), f"{u}_per_drawing_step": per["forward"] + per["backward"],
                f"{u}_once_per_image": sum(lin[p][1][k] for p in PHASES),
                f"forward_{u}": at["forward"], f"backward_{u}": at["backward"], f"optimizer_{u}": at["optimizer"],
                f"forward_{u}_per_drawing_step": per["forward"], f"backward_{u}_per_drawing_step": per["backward"]}
    if dev.type == "cuda":
        out["memops_per_step"] = sum(lin[p][2]["memops"] for p in PHASES)
    launches = out["kernels_per_step"] if dev.type == "cuda" else out["launching_ops_per_step"]
    out["launch_bound_from"] = "CUDA kernels" if dev.type == "cuda" else "kernel-launching aten ops (CPU proxy)"
    out["launch_bound_ms_at_10us"] = launches * 10e-3
    out["launch_bound_ms_at_20us"] = launches * 20e-3
    by_name = lin["forward"][0]["by_name"] + lin["backward"][0]["by_name"]
    out["top_ops_per_drawing_step"] = dict(by_name.most_common(top))
    return out
