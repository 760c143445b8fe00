"""How much memory a training step needs, before any process group starts.

    estimate(cfg, micro_batch, zero_stage, dp_size, precision) -> bytes per rank, by part

Parts (docs/cluster.md, "Memory estimate"): params, grads and Adam's state (ZeRO divides them by
the data-parallel size as DeepSpeed does), activations saved for backward counted per layer from
the config's derived sizes, and workspace (the largest im2col buffer and routing prediction, Adam's
temporaries). Checked against the peak RSS of a real step on CPU in tests/test_memory.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rcn_dist import testhooks
from rcn_dist.config import Config, ConfigError, ModelConfig
from rcn_dist.model import describe

if TYPE_CHECKING:
    from rcn_dist.parallel.env import LaunchEnv

GiB = 2**30


def _routed(n_child: int, child_dim: int, n_parent: int, parent_dim: int) -> int:
    # Saved per image: the child capsules u (einsum with W), the couplings c (B, n_child, n_parent)
    # of the last iteration (u_hat itself is not saved: c carries no gradient), and squash(s).
    return n_child * child_dim + n_child * n_parent + 2 * n_parent * parent_dim + 4 * n_parent


def _primary(n_caps: int, dim: int) -> int:
    # The reshaped conv output and the squash's product (B, n, dim), four (B, n, 1) norms.
    return 2 * n_caps * dim + 4 * n_caps


def _rnn(n_in: int, hidden: int) -> int:
    # LSTMCell and GRUCell both keep their input and a fused workspace of about 6 x hidden.
    return n_in + 6 * hidden


def _attention(c: int, h: int, w: int, n: int, read: bool) -> int:
    # Filterbanks Fx (N, W) and Fy (N, H): difference, its scaled square, the softmax-normalised
    # bank each; the einsum's half-contracted image (C, N, W) (twice for read: x and the error
    # image) and the full-size image it works on (x_hat for read, the canvas increment for write);
    # with C > 1 the read's einsum keeps a contiguous copy of both x and x_hat.
    k = 2 if read else 1
    full = 2 if read and c > 1 else 1
    return full * c * h * w + 3 * n * (h + w) + k * c * n * (w + n) + 16


def activation_elements(m: ModelConfig) -> dict[str, int]:
    """Elements saved for backward per image: {"encoder": ..., "decoder": ..., "loop": ...}.

    "encoder"/"decoder" are each stack's own (all T steps), "loop" the tensors of the loop
    between them (error image, reparameterisation, KL), and "columns": the largest im2col buffer
    of one convolution, "u_hat": the largest routing prediction tensor of one layer call.
    """
    c, h, w = m.in_channels, m.height, m.width
    # Encoder capsules, once per image: input, each ReLU output, primary capsules, class capsules.
    enc_once, columns = c * h * w, 0
    for ch, out, (mh, mw) in zip((c, *m.enc_conv_channels), m.enc_conv_channels, m.enc_conv_maps()):
        columns = max(columns, ch * m.enc_conv_kernel**2 * mh * mw)
        enc_once += out * mh * mw
    gh, gw = m.enc_primary_grid()
    columns = max(columns, m.enc_conv_channels[-1] * m.enc_primary_kernel**2 * gh * gw)
    enc_n = m.enc_primary_caps()
    enc_once += _primary(enc_n, m.enc_primary_dim)
    enc_once += _routed(enc_n, m.enc_primary_dim, m.n_classes, m.class_caps_dim)
    # Encoder, per step: read, RNN_enc, the latent head's input.
    enc_step = _rnn(m.enc_rnn_in(), m.enc_hidden) + m.enc_hidden
    if m.read_attn and m.enc_read == "on":
        enc_step += _attention(c, h, w, m.read_n, read=True)
    # Decoder, per step: seed map, transposed convs, primary capsules, routing, RNN_dec, write.
    dec_step = m.z_dim + m.dec_seed_channels * m.dec_seed_size**2
    sizes = [m.dec_seed_size, *m.dec_deconv_maps()]
    for out, size, grown in zip(m.dec_deconv_channels, sizes, sizes[1:]):
        columns = max(columns, out * m.dec_deconv_kernel**2 * size * size)
        dec_step += out * grown * grown
    g = m.dec_primary_grid()
    columns = max(columns, m.dec_deconv_channels[-1] * m.dec_primary_kernel**2 * g * g)
    dec_n = m.dec_primary_caps()
    dec_step += _primary(dec_n, m.dec_primary_dim)
    dec_step += _routed(dec_n, m.dec_primary_dim, m.dec_caps, m.dec_caps_dim)
    dec_step += _rnn(m.dec_rnn_in(), m.dec_hidden) + m.dec_hidden
    if m.write_attn:
        dec_step += _attention(c, h, w, m.write_n, read=False)
    # Between the stacks, per step: sigmoid(c_{t-1}) for the error image; z = mu + sigma * eps
    # and the KL keep exp(logvar / 2), eps and the stacked mu / logvar.
    loop_step = c * h * w + 4 * m.z_dim
    # The discretised logistic of c_T keeps about 11 (C, H, W) intermediates; Bernoulli none.
    likelihood = 11 * c * h * w if m.likelihood == "logistic" else 0
    u_hat = max(enc_n * m.n_classes * m.class_caps_dim, dec_n * m.dec_caps * m.dec_caps_dim)
    return {"encoder": enc_once + m.T * enc_step, "decoder": m.T * dec_step, "loop": m.T * loop_step + likelihood,
            "columns": columns, "u_hat": u_hat,
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
        import torch

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
