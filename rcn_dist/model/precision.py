"""Dtype rules for a model that may be held in bf16 or fp16 as a whole.

DeepSpeed's bf16/fp16 engines cast every weight and run no autocast, while the loop hands the
model its image and latent noise in fp32. Each layer then runs in its weights' dtype (its input is
cast where it enters, `cast_to`), and what sums, compares or normalises across layers is kept in
fp32 at least (`at_least_fp32`): the canvas, eps and z, mu and logvar, the KL, both likelihoods,
the attention filterbanks and the capsules' squash and routing. fp64 stays fp64, for the
exactness tests.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 unchanged (no op dispatched)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def cast_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in `dtype`. A Python check rather than x.to(dtype): where the dtype already matches (fp32
    and fp64 models, every step) no aten::to is dispatched at all."""
    return x if x.dtype == dtype else x.to(dtype)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the fp32-at-least quantities for a model held in `dtype`: fp32 for bf16/fp16,
    fp32 and fp64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


def common_wide(*ts: Tensor) -> tuple[Tensor, ...]:
    """The tensors in one dtype, their promoted dtype and fp32 at least; a tensor already in it is
    passed through without a cast op."""
    dt = torch.float32
    for t in ts:
        dt = torch.promote_types(dt, t.dtype)
    return tuple(cast_to(t, dt) for t in ts)


def autocast_on(device: torch.device) -> bool:
    """Whether a caller's autocast is on for `device` (never on the meta device, which
    torch.is_autocast_enabled would reject). A cheap check: torch.autocast(enabled=False) itself
    costs a few microseconds to enter and leave, a good part of a layer's Python overhead at a
    small batch, so the Functions only switch autocast off where it is on."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul on `device` runs in: autocast's when it is on, else `dtype` (the
    weights'). What the model's Functions, which run with autocast off, cast their operands to."""
    return torch.get_autocast_dtype(device.type) if autocast_on(device) else dtype


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on `device` for code that runs in fp32 by design (attention, routing) when a
    caller's autocast is on; the meta device (FLOP counts) has no autocast to switch off."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)
