"""Capsule usage: how much of the image the two capsule networks carry, measured.

Ablations (`ablated`, `ablation_elbos`): a forward hook shuffles the capsule outputs across the
batch (a roll by one, the same at every step) or zeroes them, and the negative ELBO of the same
images under the same noise is compared with the untouched model's. Statistics (`capsule_stats`,
cheap enough for every periodic evaluation): the spread of the outputs across images and the mean
lengths of the routed and primary capsules. docs/evaluation.md says how to read them.
Single-device: the caller sums over ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

WHICH = ("encoder", "decoder")
MODES = ("shuffle", "zero")


@contextlib.contextmanager
def ablated(model: nn.Module, which: str, mode: str) -> Iterator[None]:
    """Inside the block, the `which` capsule network's outputs are shuffled across the batch or zeroed."""
    if which not in WHICH or mode not in MODES:
        raise ValueError(f"which must be one of {WHICH} and mode one of {MODES}, got {which!r} and {mode!r}")
    # Shuffle: image b gets image b-1's capsules, no fixed point for B > 1.
    handle = getattr(model, which).capsules.register_forward_hook(
        lambda _m, _i, out: torch.roll(out, 1, dims=0) if mode == "shuffle" else torch.zeros_like(out))
    try:
        yield
    finally:
        handle.remove()


def spread(out: Tensor) -> Tensor:
    """out (B, ...) -> rms_b |o_b - mean_b o| / rms_b |o_b| over the flattened outputs (a 0-d tensor)."""
    o = out.flatten(1).double()
    return (o - o.mean(0)).pow(2).sum(1).mean().sqrt() / o.pow(2).sum(1).mean().sqrt().clamp_min(1e-30)


@torch.no_grad()
def capsule_stats(model: nn.Module, x: Tensor, eps: Tensor, x_caps: Tensor | None = None) -> dict[str, float]:
    """Spread and lengths of both capsule networks on one batch x (B, C, H, W), noise eps (B, T, z)
    (x_caps: what the encoder capsules see, RCN.forward): {which}_spread, {which}_length and
    {which}_primary_length, for the networks the model has.

    The decoder's figures are means over its T calls (one per step); spread is taken per call,
    across the batch.
    """
    seen: dict[str, list[Tensor]] = {}  # every call's routed and primary capsule outputs (no grad)
    handles = []
    for w in WHICH:
        caps = getattr(model, w).capsules
        if caps is not None:  # None where an ablation removed it
            for k, mod in ((f"{w}_caps", caps), (f"{w}_primary", caps.primary)):
                seen[k] = []
                handles.append(mod.register_forward_hook(lambda _m, _i, out, k=k: seen[k].append(out)))
    try:
        model(x, eps, x_caps)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for w in WHICH:
        caps, prim = seen.get(f"{w}_caps"), seen.get(f"{w}_primary")
        if not caps:
            continue
        out[f"{w}_spread"] = torch.stack([spread(c) for c in caps]).mean().item()
        out[f"{w}_length"] = torch.stack([c.float().norm(dim=-1).mean() for c in caps]).mean().item()
        out[f"{w}_primary_length"] = torch.stack([p.float().norm(dim=-1).mean() for p in prim]).mean().item()
    return out


@torch.no_grad()
def ablation_elbos(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor,
                   x_caps: Tensor | None = None) -> dict[str, Tensor]:
    """Per-image negative ELBO (B,) of the model as it is ("none") and with each capsule network's
    outputs shuffled or zeroed ("decoder_shuffle", ...; only for the networks the model has).
    Same images, same noise."""
    out = {"none": model.loss_terms(x, y, eps, x_caps=x_caps)["elbo"]}
    for w in WHICH:
        if getattr(model, w).capsules is None:
            continue
        for mode in MODES:
            with ablated(model, w, mode):
                out[f"{w}_{mode}"] = model.loss_terms(x, y, eps, x_caps=x_caps)["elbo"]
    return out
