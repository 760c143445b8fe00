"""How much memory a training step needs, before any process group starts.

    estimate(cfg, micro_batch, zero_stage, dp_size, precision) -> bytes per rank, by part

Parts (docs/cluster.md, "Memory estimate"): params, grads and Adam's state (ZeRO divides them by
the data-parallel size as DeepSpeed does), activations saved for backward, traced from one
forward of the model on the meta device (so that they follow any change to the model), and
workspace (the largest im2col buffer and routing prediction, Adam's temporaries). Checked against
the peak RSS of a real step on CPU in tests/test_memory.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rcn_dist import testhooks
from rcn_dist.config import Config, ConfigError, ModelConfig
from rcn_dist.model import RCN, describe

if TYPE_CHECKING:
    from rcn_dist.parallel.env import LaunchEnv

GiB = 2**30


def _traced(m: ModelConfig, batch: int) -> dict[str, float]:
    """Bytes that autograd saves for backward in one training forward (RCN.loss) of RCN(m) at
    `batch`, by where they are saved: {"encoder", "decoder", "loop"}.

    The model, image, labels and noise live on the meta device: nothing is computed or allocated,
    but every op records what its backward will read, and saved_tensors_hooks sees each such
    tensor (custom autograd Functions' save_for_backward included). Each storage counts once
    (views, and a tensor several nodes save), the parameters not at all. A tensor saved while a
    module of model.encoder (model.decoder) runs is the encoder's (decoder's); the rest ("loop") is
    what RCN.forward, the steps between the modules and the loss keep.
    """
    with torch.device("meta"):
        model = RCN(m)
        x = torch.zeros(batch, m.in_channels, m.height, m.width)
        y = torch.zeros(batch, dtype=torch.long)
        eps = torch.zeros(batch, m.T, m.z_dim)
    # A meta storage has no data pointer; its StorageImpl's address (_cdata) names it, and the
    # tensors kept below keep every address taken while the trace runs.
    seen = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: list[Tensor] = []
    inside = {"encoder": 0, "decoder": 0}
    saved = {"encoder": 0.0, "decoder": 0.0, "loop": 0.0}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s._cdata not in seen:
            seen.add(s._cdata)
            kept.append(t)
            where = "encoder" if inside["encoder"] else "decoder" if inside["decoder"] else "loop"
            saved[where] += s.nbytes()
        return t

    def enter(stack: str):
        def hook(*_) -> None:
            inside[stack] += 1
        return hook

    def leave(stack: str):
        def hook(*_) -> None:
            inside[stack] -= 1
        return hook

    for stack in inside:
        for mod in getattr(model, stack).modules():
            mod.register_forward_pre_hook(enter(stack))
            mod.register_forward_hook(leave(stack))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(x, y, eps)
    return saved


TRACE_BATCH = 2
"""The batch of the meta trace; the estimate scales its per-image bytes to the micro-batch."""

_CACHE: dict[str, dict[str, int]] = {}


def saved_elements(m: ModelConfig) -> dict[str, int]:
    """Elements per image that autograd saves for backward, {"encoder", "decoder", "loop"}: the
    meta trace's bytes (`_traced`, an fp32 model) / 4 / its batch. Cached per model config (its
    repr: every field), for check_fits' three estimates."""
    key = repr(m)
    if key not in _CACHE:
        _CACHE[key] = {k: round(v / 4 / TRACE_BATCH) for k, v in _traced(m, TRACE_BATCH).items()}
    return dict(_CACHE[key])


def activation_elements(m: ModelConfig) -> dict[str, int]:
    """Elements saved for backward per image: {"encoder": ..., "decoder": ..., "loop": ...}, from
    the meta-device trace of one training forward (`saved_elements`).

    "encoder"/"decoder" are what each stack's modules save (all T steps), "loop" the tensors
    saved between them (the input cat, error image, reparameterisation, KL, the likelihood). Not
    saved, so counted from the config's sizes: "columns", the largest im2col buffer of one
    convolution, and "u_hat", the largest routing prediction tensor of one layer call (workspace
    that lives only while its layer runs).
    """
    c = m.in_channels
    columns = 0
    for ch, (mh, mw) in zip((c, *m.enc_conv_channels), m.enc_conv_maps()):
        columns = max(columns, ch * m.enc_conv_kernel**2 * mh * mw)
    gh, gw = m.enc_primary_grid()
    columns = max(columns, m.enc_conv_channels[-1] * m.enc_primary_kernel**2 * gh * gw)
    sizes = [m.dec_seed_size, *m.dec_deconv_maps()]
    for out, size in zip(m.dec_deconv_channels, sizes):
        columns = max(columns, out * m.dec_deconv_kernel**2 * size * size)
    g = m.dec_primary_grid()
    columns = max(columns, m.dec_deconv_channels[-1] * m.dec_primary_kernel**2 * g * g)
    enc_n, dec_n = m.enc_primary_caps(), m.dec_primary_caps()
    u_hat = max(enc_n * m.n_classes * m.class_caps_dim, dec_n * m.dec_caps * m.dec_caps_dim)
    return {**saved_elements(m), "columns": columns, "u_hat": u_hat,
            "dec_u_hat_all_steps": m.T * dec_n * m.dec_caps * m.dec_caps_dim}


def estimate(cfg: Config, micro_batch: int, zero_stage: int, dp_size: int, precision: str) -> dict[str, Any]:
    """Bytes per rank of one training step, by part, and their total (see the module docstring).

    With parallel.pipeline_stages = 2 it is the larger of the two stages (encoder or decoder
    stack), with all micro-batches of a step in flight as the looped schedules keep them.
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"memory estimate: precision must be fp32, bf16 or fp16, got {precision!r}")
    half = precision != "fp32"
    val_b = 2 if half else 4  # bytes of a weight, gradient or activation
    n = activation_elements(cfg.model)
    counts = describe(cfg.model)
    if cfg.parallel.pipeline_stages > 1:
        # Each rank holds one stack; the loop's tensors are split between them about evenly.
        stages = [(counts["encoder_params"], n["encoder"] + n["loop"] // 2),
                  (counts["decoder_params"], n["decoder"] + n["loop"] - n["loop"] // 2)]
        psi, act = max(stages, key=lambda s: 16 * s[0] + val_b * micro_batch * s[1])
    else:
        psi, act = counts["params"], n["encoder"] + n["decoder"] + n["loop"]
    shard = max(dp_size, 1)
    # Adam's step makes about one fp32 temporary per parameter it updates (sqrt of the second moment).
    opt_temp = 4 * psi / (shard if zero_stage >= 1 else 1)
    parts = {"params": val_b * psi / (shard if zero_stage >= 3 else 1),
             "grads": val_b * psi / (shard if zero_stage >= 2 else 1),
             "optimizer": (12 if half else 8) * psi / (shard if zero_stage >= 1 else 1),
             "activations": val_b * micro_batch * act,
             "workspace": val_b * micro_batch * (n["columns"] + 2 * n["u_hat"]) + opt_temp}
    out: dict[str, Any] = {k: int(v) for k, v in parts.items()}
    return out | {"total": sum(out.values()),
                  "u_hat_all_steps": val_b * micro_batch * n["dec_u_hat_all_steps"], "n_params": psi}


def available_bytes(device: str, local_world_size: int = 1) -> int:
    """Memory one rank may use: the GPU's total memory, or on CPU the node's available RAM
    (/proc/meminfo MemAvailable) shared by the ranks on this node."""
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_properties(index).total_memory
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024 // max(local_world_size, 1)


def _fmt(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.1f} MiB"


def check_fits(cfg: Config, le: LaunchEnv, device_bytes: int | None = None) -> dict[str, Any]:
    """Refuse (ConfigError, one line) a run whose estimate exceeds what the device has.

    `cfg` must be resolved (train.micro_batch, train.precision, parallel.zero_stage filled in, as
    engine.resolve_engine_settings does); `le` is the LaunchEnv. The message names the largest
    micro-batch that fits. RCN_SKIP_MEMORY_CHECK=1 skips the check. Returns the estimate.
    """
    t, p = cfg.train, cfg.parallel
    est = estimate(cfg, t.micro_batch, p.zero_stage, le.dp_size, t.precision)
    if testhooks.skip_memory_check():
        return est
    have = available_bytes(le.device, le.local_world_size) if device_bytes is None else device_bytes
    if est["total"] <= have:
        return est
    # Everything that grows with the batch grows linearly: solve for the micro-batch.
    one = estimate(cfg, 1, p.zero_stage, le.dp_size, t.precision)["total"]
    per_image = estimate(cfg, 2, p.zero_stage, le.dp_size, t.precision)["total"] - one
    fixed = one - per_image
    fit = int((have - fixed) // per_image) if have > fixed else 0
    where = f"{le.device} ({_fmt(have)}{' available' if le.device == 'cpu' else ''})"
    head = (f"memory estimate {_fmt(est['total'])} per rank (activations {_fmt(est['activations'])} at "
            f"train.micro_batch={t.micro_batch}, model and optimizer state {_fmt(fixed)}, {t.precision}, "
            f"ZeRO {p.zero_stage}) exceeds {where}")
    if fit >= 1:
        hint = (f"the largest micro-batch that fits is {fit} (keep the global batch with "
                f"train.grad_accum >= {-(-t.micro_batch // fit) * t.grad_accum})")
    else:
        hint = ("not even micro-batch 1 fits: shard the state (higher ZeRO stage, more ranks), "
                "split the model (parallel.pipeline_stages=2) or shorten model.T")
    raise ConfigError(f"{head}; {hint} (RCN_SKIP_MEMORY_CHECK=1 skips this check)")
