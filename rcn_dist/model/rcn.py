"""The Recurrent Capsule Network: DRAW with a capsule network before each of its two RNNs.

Two stacks, kept apart so that a pipeline can put them on different ranks:

    encoder: capsules(x) once per image; then per step t
             read(x, x - sigmoid(c_{t-1}), h_dec_{t-1}) -> RNN_enc -> (mu_t, logvar_t) -> z_t
    decoder: per step t
             capsules(z_t) -> RNN_dec -> c_t = c_{t-1} + write(h_dec_t)

The only state crossing from the decoder back to the encoder each step is (h_dec_t, c_t).
RCN.forward only runs the loop; every weight lives in `encoder` or `decoder`.

Precision. The model may be held in bf16 or fp16 as a whole (DeepSpeed's bf16/fp16 engines cast
every weight, with no autocast) while its inputs x and eps come in fp32. Each layer (Linear,
LSTMCell/GRUCell, the convolutions) then runs in its weights' dtype: its input is cast to that dtype
where it enters. What sums or compares across layers stays in fp32 at least (fp64 stays fp64): the
canvas, which adds T writes (in bf16 a write below half an ulp of the canvas, 2^-6 at a logit of 4,
would be lost), the latent noise eps and z = mu + sigma eps (bf16 would round the sample itself),
mu and logvar, the KL and both likelihoods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rcn_dist.config import ModelConfig
from rcn_dist.model import losses
from rcn_dist.model.attention import Reader, Writer, window_dict
from rcn_dist.model.capsules import PrimaryCapsules, RoutedCapsules, scaled_init_
from rcn_dist.model.cells import Linear, LSTMCell, linear_grads
from rcn_dist.model.precision import at_least_fp32, autocast_dtype, cast_to, no_autocast, wide_dtype

State = tuple[Tensor, ...]
"""RNN state: (h, c) for an LSTM, (h,) for a GRU; h is always state[0] (`hidden`)."""


def hidden(state: State) -> Tensor:
    """The hidden output h of an RNN state, (B, hidden): what the next layer reads."""
    return state[0]


@dataclass
class Carry:
    """What passes between drawing steps, and between the encoder and the decoder of one step.

    RCN.forward hands one from step to step (enc_state, dec_state, canvas); the pipeline's stages
    (parallel/pipeline.py) send one across each rank boundary, where it also holds what the last
    stage needs from the encoder rank (caps, kl) and, from enc_t to dec_t, z_t. A field that does
    not cross a boundary is left empty there (() for a state, None for a tensor).

    The fields' order is the order of `tensors`, the flat tuple that travels.
    """

    enc_state: State = ()
    """RNN_enc's state after the step, (h, c) or (h,), each (B, enc_hidden)."""
    caps: Tensor | None = None
    """The class capsules flattened, (B, n_classes * class_caps_dim): computed once per image."""
    kl: Tensor | None = None
    """(B,) the KL summed over the steps so far (the pipeline's; RCN.forward stacks mu, logvar)."""
    dec_state: State = ()
    """RNN_dec's state, (h, c) or (h,), each (B, dec_hidden); h is h_dec (`h_dec`)."""
    canvas: Tensor | None = None
    """(B, C, H, W) the canvas logits c_t, fp32 at least."""
    z: Tensor | None = None
    """(B, z_dim) the latent sample z_t, from the encoder to the decoder of step t."""

    FIELDS = ("enc_state", "caps", "kl", "dec_state", "canvas", "z")
    """Every field, in the order `tensors` lays them out."""

    @property
    def h_dec(self) -> Tensor:
        """h_dec (B, dec_hidden): the decoder's hidden output, which the next encoder step reads."""
        return hidden(self.dec_state)

    def tensors(self, fields: Sequence[str]) -> tuple[Tensor, ...]:
        """The named fields (a state as its tensors) as one flat tuple, in FIELDS order: what a
        pipeline stage returns. Each must be set."""
        out: list[Tensor] = []
        for f in self.FIELDS:
            if f not in fields:
                continue
            v = getattr(self, f)
            if v is None or (isinstance(v, tuple) and not v):
                raise ValueError(f"carry field {f} is not set")
            out += v if isinstance(v, tuple) else [v]
        return tuple(out)

    @classmethod
    def from_tensors(cls, tensors: Sequence[Tensor], fields: Sequence[str], state_size: int) -> Carry:
        """The inverse of `tensors`: the named fields back from the flat tuple; each RNN state is
        `state_size` tensors (2 for an LSTM, 1 for a GRU)."""
        it = iter(tensors)
        kw: dict[str, object] = {}
        for f in cls.FIELDS:
            if f in fields:
                kw[f] = tuple(next(it) for _ in range(state_size)) if f.endswith("_state") else next(it)
        if next(it, None) is not None:
            raise ValueError(f"more carried tensors than the fields {tuple(fields)} hold")
        return cls(**kw)  # type: ignore[arg-type]


def _cell(kind: str, n_in: int, hidden: int) -> nn.Module:
    # cells.LSTMCell: an nn.LSTMCell (same parameters, state dict and checkpoints) whose forward is
    # the written-out cells.lstm_cell; the GRU is torch's.
    return LSTMCell(n_in, hidden) if kind == "lstm" else nn.GRUCell(n_in, hidden)


class _Stack(nn.Module):
    """What the encoder and decoder stacks share: an RNN cell `rnn`, LSTMCell or GRUCell."""

    def init_state(self, batch: int, like: Tensor) -> State:
        """Zero RNN state on like's device, in the RNN's weight dtype (like may be the fp32 image
        of a bf16-held model): (h, c) for an LSTM, (h,) for a GRU, each (batch, hidden)."""
        h = like.new_zeros(batch, self.rnn.hidden_size, dtype=self.rnn.weight_hh.dtype)
        return (h, torch.zeros_like(h)) if isinstance(self.rnn, nn.LSTMCell) else (h,)

    def _run_rnn(self, inp: Tensor, state: State) -> State:
        """inp (B, n_in), any float dtype: cast once to the cell's weights (its state already is,
        being the cell's own output or init_state's)."""
        inp = cast_to(inp, self.rnn.weight_ih.dtype)
        if isinstance(self.rnn, nn.LSTMCell):
            # cells.lstm_cell on the module's own parameters, through the module's forward: the FLOP
            # counter's hooks and ZeRO-3's parameter gathering hang on it.
            return self.rnn(inp, state)  # a tuple (h, c) already
        return (self.rnn(inp, hidden(state)),)


class _GaussianFn(torch.autograd.Function):
    """(h (B, hidden), W (2 z, hidden), b (2 z,), eps (B, z)) -> (z, mu, logvar), each (B, z):
    (mu, logvar) = h W^T + b, z = mu + exp(logvar / 2) eps, as one Function. The matmul runs in
    `dtype` (the weights' or autocast's); mu, logvar and z in fp32 at least. Autograd's graph of
    the linear, chunk, exp and addcmul costs about 15 backward ops a step; this one 8."""

    @staticmethod
    def forward(ctx, h, weight, bias, eps, dtype):
        h_c, w_c = cast_to(h, dtype), cast_to(weight, dtype)
        out = at_least_fp32(torch.nn.functional.linear(h_c, w_c, cast_to(bias, dtype)))  # (B, 2 z)
        mu, logvar = out.chunk(2, dim=1)
        sigma = torch.exp(0.5 * logvar)
        ctx.save_for_backward(h_c, w_c, sigma, eps)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype)
        ctx.set_materialize_grads(False)
        return torch.addcmul(mu, sigma, eps), mu, logvar

    @staticmethod
    def backward(ctx, dz, dmu, dlogvar):
        h_c, w_c, sigma, eps = ctx.saved_tensors
        zeros = None
        if dz is None or dmu is None or dlogvar is None:
            zeros = torch.zeros_like(sigma)
        dz, dmu, dlogvar = (zeros if g is None else g for g in (dz, dmu, dlogvar))
        # d mu = dmu + dz; d logvar = dlogvar + dz eps sigma / 2; then the linear's gradients, from
        # d_out in the matmul's dtype (as autograd hands an nn.Linear under autocast its gradient).
        d_out = cast_to(torch.cat([dmu + dz, torch.addcmul(dlogvar, dz, eps * sigma, value=0.5)], 1), w_c.dtype)
        return (*linear_grads(d_out, h_c, w_c, ctx.needs_input_grad[:3], ctx.dtypes), None, None)


class GaussianHead(nn.Linear):
    """The encoder's latent head: h (B, hidden) and eps (B, z) -> (z, mu, logvar), each (B, z), fp32
    at least. An nn.Linear(hidden, 2 z) (its weights are mu's rows, then logvar's), so that its
    parameters and their names are those of a plain Linear, and its forward is the module's own
    (ZeRO-3 gathers a module's weights around its forward)."""

    def forward(self, h: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        dtype = autocast_dtype(h.device, self.weight.dtype)
        with no_autocast(h.device):
            return _GaussianFn.apply(h, self.weight, self.bias, eps, dtype)


class EncoderCapsules(nn.Module):
    """x (B, C, H, W) -> class capsules (B, n_classes, class_caps_dim): convs, primary caps, routing."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = cfg.in_channels
        for out in cfg.enc_conv_channels:
            layers += [nn.Conv2d(ch, out, cfg.enc_conv_kernel), nn.ReLU()]
            ch = out
        self.convs = nn.Sequential(*layers)
        self.primary = PrimaryCapsules(ch, cfg.enc_primary_types, cfg.enc_primary_dim,
                                       cfg.enc_primary_kernel, cfg.enc_primary_stride)
        self.classes = RoutedCapsules(cfg.enc_primary_caps(), cfg.enc_primary_dim, cfg.n_classes,
                                      cfg.class_caps_dim, cfg.routing_iters)
        if cfg.caps_init == "scaled":
            scaled_init_(self.convs, self.primary)

    def forward(self, x: Tensor) -> Tensor:
        # x (B, C, H, W) fp32 also for a bf16-held model: the first conv takes its weights' dtype.
        return self.classes(self.primary(self.convs(cast_to(x, self.primary.conv.weight.dtype))))


class DecoderCapsules(nn.Module):
    """z (B, z_dim) -> capsules (B, dec_caps, dec_caps_dim): linear seed map, transposed convs,
    primary caps, routing."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.seed_shape = (cfg.dec_seed_channels, cfg.dec_seed_size, cfg.dec_seed_size)
        bias = not cfg.dec_caps_odd
        self.act: nn.Module = nn.Tanh() if cfg.dec_caps_odd else nn.ReLU()
        self.seed = Linear(cfg.z_dim, cfg.dec_seed_channels * cfg.dec_seed_size**2, bias=bias)
        layers: list[nn.Module] = []
        ch = cfg.dec_seed_channels
        for out in cfg.dec_deconv_channels:
            layers += [nn.ConvTranspose2d(ch, out, cfg.dec_deconv_kernel, bias=bias), self.act]
            ch = out
        self.deconvs = nn.Sequential(*layers)
        self.primary = PrimaryCapsules(ch, cfg.dec_primary_types, cfg.dec_primary_dim,
                                       cfg.dec_primary_kernel, cfg.dec_primary_stride, bias=bias)
        self.caps = RoutedCapsules(cfg.dec_primary_caps(), cfg.dec_primary_dim, cfg.dec_caps,
                                   cfg.dec_caps_dim, cfg.routing_iters)
        if cfg.caps_init == "scaled":
            scaled_init_(nn.ModuleList([self.seed, self.deconvs]), self.primary)

    def forward(self, z: Tensor) -> Tensor:
        # z (B, z_dim) is fp32 at least (Encoder.step); the seed layer takes its weights' dtype.
        m = self.act(self.seed(cast_to(z, self.seed.weight.dtype))).view(-1, *self.seed_shape)
        return self.caps(self.primary(self.deconvs(m)))


class Encoder(_Stack):
    """The encoder stack: capsules, the reader's window layer, RNN_enc and the latent head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.capsules = EncoderCapsules(cfg) if cfg.enc_capsules else None
        c, h, w = cfg.in_channels, cfg.height, cfg.width
        self.reads = cfg.enc_read == "on"  # off: RNN_enc sees the image only through the capsules
        self.reader = Reader(cfg.dec_hidden, c, h, w, cfg.read_n) if cfg.read_attn and self.reads else None
        self.rnn = _cell(cfg.rnn, cfg.enc_rnn_in(), cfg.enc_hidden)
        self.latent = GaussianHead(cfg.enc_hidden, 2 * cfg.z_dim)

    def step(
        self, x: Tensor, caps_flat: Tensor, canvas_prev: Tensor, h_dec_prev: Tensor, state: State, eps_t: Tensor
    ) -> tuple[State, Tensor, Tensor, Tensor, dict[str, Tensor] | None]:
        """One encoder step. x, canvas_prev: (B, C, H, W) image and canvas logits c_{t-1};
        caps_flat: (B, n_classes * class_caps_dim) from `capsules(x).flatten(1)`, computed once;
        h_dec_prev: (B, dec_hidden); state: RNN_enc state; eps_t: (B, z_dim) standard normal noise.
        Returns (state, z (B, z_dim), mu (B, z_dim), logvar (B, z_dim), the read window record (B, 5)
        or None).

        z, mu and logvar are fp32 at least whatever the weights' dtype (fp64 for an fp64 model);
        eps_t is used as it comes (fp32), never rounded to the weights' dtype.
        """
        if self.reader is not None:
            # The glimpses of x and of x_hat = x - sigmoid(c_{t-1}), in fp32 at least (the
            # filterbank's dtype); RNN_enc casts the cat below to its weights.
            glimpse, win = self.reader(x, canvas_prev, h_dec_prev)  # (B, 2*C*N*N)
            inp = torch.cat([caps_flat, glimpse, h_dec_prev], 1)
        elif not self.reads:  # enc_read=off: (B, K*D + dec_hidden), the paper's list of inputs
            inp, win = torch.cat([caps_flat, h_dec_prev], 1), None
        else:  # one cat of everything RNN_enc reads: (B, K*D + 2*C*H*W + dec_hidden)
            x_hat = x - torch.sigmoid(canvas_prev)  # (B, C, H, W), fp32 at least: the canvas is
            inp, win = torch.cat([caps_flat, x.flatten(1), x_hat.flatten(1), h_dec_prev], 1), None
        state = self._run_rnn(inp, state)
        # The head's matmul in its weights' dtype, its output widened once: mu, logvar, sigma and
        # z = mu + sigma * eps in fp32 at least.
        z, mu, logvar = self.latent(hidden(state), eps_t)
        return state, z, mu, logvar, win


class Decoder(_Stack):
    """The decoder stack: capsules, RNN_dec, the writer, and the logistic likelihood's scales."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.capsules = DecoderCapsules(cfg) if cfg.dec_capsules else None
        # After the capsules, not inside them: RCN.decoder.capsules stays the capsule network
        # whose squashed lengths and spread the usage figures report.
        n_caps = cfg.dec_caps * cfg.dec_caps_dim
        self.caps_norm = nn.LayerNorm(n_caps, bias=False) if cfg.dec_capsules and cfg.dec_caps_norm else None
        c, h, w = cfg.in_channels, cfg.height, cfg.width
        self.rnn = _cell(cfg.rnn, cfg.dec_rnn_in(), cfg.dec_hidden)
        self.writer: nn.Module = (Writer(cfg.dec_hidden, c, h, w, cfg.write_n) if cfg.write_attn
                                  else Linear(cfg.dec_hidden, c * h * w))
        # Log-scale of the discretised logistic, one per channel, in [0, 1] pixel units.
        self.log_scale = nn.Parameter(torch.full((c,), -3.0)) if cfg.likelihood == "logistic" else None

    def step(self, z: Tensor, state: State, canvas_prev: Tensor) -> tuple[State, Tensor, dict[str, Tensor] | None]:
        """One decoder step: z (B, z_dim), RNN_dec state, canvas_prev (B, C, H, W) logits ->
        (state, canvas (B, C, H, W) logits, the write window record (B, 5) or None). h_dec_t is hidden(state).

        z may be fp32 for a bf16-held decoder (each layer casts it where it enters); the canvas
        returned is fp32 at least (fp64 for an fp64 model), whatever canvas_prev's dtype.
        """
        inp = z
        if self.capsules is not None:
            inp = self.capsules(z).flatten(1)  # (B, dec_caps * dec_caps_dim)
            if self.caps_norm is not None:
                inp = self.caps_norm(cast_to(inp, self.caps_norm.weight.dtype))
            if self.cfg.dec_z_skip:
                inp = torch.cat([inp, z], 1)  # (B, dec_caps * dec_caps_dim + z_dim), cast by _run_rnn
        state = self._run_rnn(inp, state)
        if self.cfg.write_attn:
            canvas, win = self.writer(hidden(state), canvas_prev)  # c_{t-1} + write(h_dec_t), fp32 at least
        else:
            # One add: type promotion widens a bf16 write to the fp32 canvas inside it (no cast
            # op), and the sum of T writes is kept in fp32.
            canvas, win = at_least_fp32(canvas_prev) + self.writer(hidden(state)).view_as(canvas_prev), None
        return state, canvas, win

    def recon_nll(self, canvas_logits: Tensor, x: Tensor) -> Tensor:
        """-log D(x | c_T) per image (B,), nats: canvas_logits, x (B, C, H, W); fp32 at least."""
        if self.cfg.likelihood == "bernoulli":
            return losses.bernoulli_nll(canvas_logits, x)
        return losses.discretized_logistic_nll(canvas_logits, self.log_scale, x)

    def loss_terms(self, out: RCNOutput, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per-image terms of a forward pass's output, each (B,) (see RCN.loss_terms). Here, on
        the decoder, because the logistic likelihood's scale lives here: the pipeline's last stage
        calls it with the class capsules and KL its encoder rank sent."""
        c = self.cfg
        lengths = at_least_fp32(out.class_lengths)  # (B, n_classes): the margin loss in fp32 at least
        if c.enc_capsules:
            margin = losses.margin_loss(lengths, y, c.m_plus, c.m_minus, c.margin_lambda)
        else:  # no classifier to train
            margin = torch.zeros_like(lengths[:, 0])
        recon = self.recon_nll(out.last_canvas, x)
        kl = at_least_fp32(out.kl).sum(dim=1)
        elbo = recon + kl
        return {"margin": margin, "recon": recon, "kl": kl, "elbo": elbo,
                "loss": elbo + c.margin_weight * margin, "correct": losses.top_k_correct(lengths, y)}


@dataclass
class RCNOutput:
    """What one forward pass returns. B images, T steps."""

    canvas: Tensor
    """(B, T, C, H, W) canvas logits after each step, a record without gradient history (as the
    windows are): canvas[:, -1] holds c_T's values. Stacked under no_grad, so that the T - 1
    canvases no loss reads send no zero gradients back (a select and an add a drawing step)."""
    last_canvas: Tensor
    """(B, C, H, W) c_T, with its gradient: what the likelihood reads."""
    class_caps: Tensor
    """(B, n_classes, class_caps_dim) encoder class capsules."""
    class_lengths: Tensor
    """(B, n_classes) their lengths: the classification."""
    kl: Tensor
    """(B, T) KL(q(z_t | x) || N(0, I)) per step, nats."""
    mu: Tensor
    """(B, T, z_dim) posterior means."""
    logvar: Tensor
    """(B, T, z_dim) posterior log-variances."""
    read_windows: dict[str, Tensor] | None
    """cx, cy, delta, sigma2, gamma, each (B, T), DRAW's pixel units; None without read attention."""
    write_windows: dict[str, Tensor] | None
    """Same for the write windows; None without write attention."""


def _stack_windows(wins: Sequence[Tensor | None]) -> dict[str, Tensor] | None:
    """The T steps' packed window records (B, 5) -> {cx, cy, sigma2, delta, gamma}, each (B, T)."""
    if wins[0] is None:
        return None
    return window_dict(torch.stack(wins, 1))


class RCN(nn.Module):
    """Recurrent Capsule Network. Build it from `cfg.model`: ``RCN(preset("tiny").model)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _noise(self, batch: int, like: Tensor, eps: Tensor | None) -> Tensor:
        """eps (batch, T, z_dim) on like's device, fp32 at least: never rounded to a bf16/fp16
        `like` (the noise is part of the sample, not of the arithmetic)."""
        shape = (batch, self.cfg.T, self.cfg.z_dim)
        dtype = wide_dtype(like.dtype)
        if eps is None:
            return torch.randn(shape, device=like.device, dtype=dtype)
        if tuple(eps.shape) != shape:
            raise ValueError(f"eps must have shape {shape}, got {tuple(eps.shape)}")
        return eps.to(device=like.device, dtype=torch.promote_types(eps.dtype, dtype))

    def forward(self, x: Tensor, eps: Tensor | None = None, x_caps: Tensor | None = None) -> RCNOutput:
        """x (B, C, H, W) in [0, 1]; eps (B, T, z_dim) latent noise (None: torch.randn); x_caps
        (B, C, H, W): what the encoder capsules see instead of x (the grey image where x is its
        binarised draw, `data.caps_input`); the RNNs and the likelihood always see x.

        x and eps are expected in fp32 (fp64 for an fp64 model) whatever the weights' dtype; the
        canvas, mu, logvar and kl come back in fp32 at least."""
        b = x.shape[0]
        eps = self._noise(b, x, eps)
        if self.encoder.capsules is not None:
            caps = self.encoder.capsules(x if x_caps is None else x_caps)
            caps_flat = caps.flatten(1)
        else:  # no classifier: zero-length class capsules, nothing for RNN_enc
            caps = x.new_zeros(b, self.cfg.n_classes, self.cfg.class_caps_dim)
            caps_flat = x.new_zeros(b, 0)
        carry = Carry(enc_state=self.encoder.init_state(b, x), dec_state=self.decoder.init_state(b, x),
                      canvas=torch.zeros_like(x, dtype=wide_dtype(x.dtype)))  # c_0 = 0, (B, C, H, W)
        steps = []  # (canvas, mu, logvar, read windows, write windows) of each step
        for eps_t in eps.unbind(1):  # one op, not a select a step
            carry, mu, logvar, rwin, wwin = self.draw_step(carry, x, caps_flat, eps_t)
            steps.append((carry.canvas, mu, logvar, rwin, wwin))
        canvas = carry.canvas
        canvases, mus, logvars, rwins, wwins = zip(*steps)
        mu, logvar = torch.stack(mus, 1), torch.stack(logvars, 1)
        with torch.no_grad():  # the record (RCNOutput.canvas); the loss reads c_T, `canvas` here
            record = torch.stack(canvases, 1)
        return RCNOutput(
            canvas=record, last_canvas=canvas, class_caps=caps, class_lengths=at_least_fp32(caps).norm(dim=-1),
            kl=losses.kl_standard_normal(mu, logvar), mu=mu, logvar=logvar,
            read_windows=_stack_windows(rwins), write_windows=_stack_windows(wwins),
        )

    def draw_step(self, carry: Carry, x: Tensor, caps_flat: Tensor, eps_t: Tensor
                  ) -> tuple[Carry, Tensor, Tensor, dict[str, Tensor] | None, dict[str, Tensor] | None]:
        """One drawing step t: the encoder, then the decoder, on carry (the states and c_{t-1})
        -> (the carry after step t, mu_t, logvar_t (B, z_dim), the read and write window records
        (B, 5) or None). x (B, C, H, W); caps_flat (B, K*D); eps_t (B, z_dim)."""
        enc_state, z, mu, logvar, rwin = self.encoder.step(x, caps_flat, carry.canvas, carry.h_dec,
                                                           carry.enc_state, eps_t)
        dec_state, canvas, wwin = self.decoder.step(z, carry.dec_state, carry.canvas)
        return Carry(enc_state=enc_state, dec_state=dec_state, canvas=canvas, z=z), mu, logvar, rwin, wwin

    def loss_terms(self, x: Tensor, y: Tensor, eps: Tensor | None = None, out: RCNOutput | None = None,
                   x_caps: Tensor | None = None) -> dict[str, Tensor]:
        """Per-image terms, each (B,): margin, recon, kl (summed over T), elbo (= recon + kl, the
        negative ELBO, an upper bound on -log p(x) in nats), loss (= elbo + margin_weight *
        margin, what training minimises) and correct (bool).

        y: (B,) integer classes, or (B, n_classes) multi-hot; with multi-hot labels an image is
        correct when its k longest capsules are exactly its k labelled classes.
        """
        return self.decoder.loss_terms(self(x, eps, x_caps) if out is None else out, x, y)

    def loss(self, x: Tensor, y: Tensor, eps: Tensor | None = None,
             x_caps: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss = recon + kl + margin_weight * margin (batch means, nats) and its parts
        {"margin", "recon", "kl", "elbo", "loss"} as scalar tensors."""
        terms = self.loss_terms(x, y, eps, x_caps=x_caps)
        parts = {k: terms[k].mean() for k in ("margin", "recon", "kl", "elbo", "loss")}
        return parts["loss"], parts

    @torch.no_grad()
    def generate(self, n: int, eps: Tensor | None = None,
                 device: torch.device | str | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Draw n images from the prior, z_t ~ N(0, I) (or eps (n, T, z_dim)), through the decoder:
        the canvas after every step as means in [0, 1], (n, T, C, H, W), and the write windows
        (each (n, T)), or None without write attention."""
        c = self.cfg
        p = next(self.parameters())
        like = torch.empty(0, device=device if device is not None else p.device, dtype=p.dtype)
        eps = self._noise(n, like, eps)
        canvas = like.new_zeros(n, c.in_channels, c.height, c.width, dtype=wide_dtype(p.dtype))
        state = self.decoder.init_state(n, like)
        canvases, wins = [], []
        for t in range(c.T):
            state, canvas, win = self.decoder.step(eps[:, t], state, canvas)
            canvases.append(torch.sigmoid(canvas))
            wins.append(win)
        return torch.stack(canvases, 1), _stack_windows(wins)


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of an integer (a bijection on 64 bits)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _int64(c: int) -> int:
    """The int64 holding the 64 bits of c (c - 2^64 above 2^63 - 1): how torch takes the constant."""
    c &= _MASK64
    return c - (1 << 64) if c >> 63 else c


_MIX_MUL = (_int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB))


def _mix64_(x: Tensor) -> Tensor:
    """_mix64 on an int64 tensor, in place (x must be a fresh tensor); returns x.

    int64 multiplication wraps mod 2^64, which is the arithmetic splitmix64 wants. torch's >> on
    int64 is arithmetic (it copies the sign bit), so the bits shifted in are masked off to make it
    the logical shift: (x >> k) & (2^(64-k) - 1).
    """
    x ^= (x >> 30).bitwise_and_((1 << 34) - 1)
    x *= _MIX_MUL[0]
    x ^= (x >> 27).bitwise_and_((1 << 37) - 1)
    x *= _MIX_MUL[1]
    x ^= (x >> 31).bitwise_and_((1 << 33) - 1)
    return x


def sample_noise(indices: Tensor, seed: int, T: int, z_dim: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Latent noise (B, T, z_dim) that depends only on (seed, sample index), never on the batch.

    A counter-based draw, all tensor ops on `device` (default: indices' device): entry (b, t, d) is
    a 64-bit hash of (seed, indices[b], t, d), its top 52 bits a uniform u in (0, 1) (never 0 or
    1), and Phi^-1(u) (torch.special.ndtri, in fp64) the standard normal (|z| < 8.3). So a sample gets the same
    noise whichever batch, micro-batch or rank it lands in, and its (t, d) entry is the same for
    any T and z_dim that contain it. For fresh noise every optimizer step, fold the step into
    `seed` (step_noise_seed).

    The hash: a per-sample key k_b = mix(mix(seed') ^ mix(index)) and a per-(t, d) key
    c_td = mix((t * 2^32 + d) * phi + 1), mix being splitmix64's finaliser (a bijection), then
    mix(k_b ^ c_td). The per-sample and per-(t, d) keys are small tensors; one mix runs over the
    B * T * z_dim entries.
    """
    dev = torch.device(device) if device is not None else indices.device
    key = _mix64(int(seed) * _GOLDEN + 0x632BE59BD9B4E019)
    row = _mix64_(indices.to(device=dev, dtype=torch.int64, copy=True))  # (B,)
    row ^= _int64(key)
    row = _mix64_(row)
    t = torch.arange(T, device=dev, dtype=torch.int64)
    d = torch.arange(z_dim, device=dev, dtype=torch.int64)
    ctr = ((t << 32)[:, None] + d[None, :]).view(-1)  # (T * z_dim,), d < 2^32
    col = _mix64_(ctr.mul_(_int64(_GOLDEN)).add_(1))  # (T * z_dim,)
    bits = _mix64_(row[:, None] ^ col[None, :])  # (B, T * z_dim)
    # The top 52 bits as a signed k in [-2^51, 2^51) (the arithmetic shift: no mask needed here)
    # -> u = (k + 2^51 + 1/2) / 2^52 in [2^-53, 1 - 2^-53], exact in fp64: ndtri is finite.
    u = (bits >> 12).to(torch.float64).add_(2.0**51 + 0.5).mul_(2.0**-52)
    return torch.special.ndtri(u).view(len(indices), T, z_dim).to(dtype)


def step_noise_seed(seed: int, step: int) -> int:
    """`seed` folded with `step` (an optimizer step, an importance sample): a fresh noise stream
    per step; the sample index picks the draw inside it."""
    return (seed * 1_000_003 + step) % (2**62)


def noise_for(batch: dict[str, Tensor], seed: int, cfg, device: torch.device | str | None = None) -> Tensor:
    """Latent noise eps (B, T, z) of a loader batch from (seed, sample index): the same whatever
    the layout. `cfg` is the run's Config (its model.T and model.z_dim). Drawn on `device` (default:
    the indices' device): on a GPU only the (B,) indices cross from the host."""
    return sample_noise(batch["index"], seed, cfg.model.T, cfg.model.z_dim, device=device)


def _n_params(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def describe(cfg: ModelConfig, batch: int = 128) -> dict[str, int]:
    """Sizes for docs/model.md and memory.py: parameter counts (the model built on the meta device)
    and the routing predictions u_hat, in elements per image (the encoder's once, the decoder's per
    step) and in fp32 bytes at `batch` (the decoder's for all T steps, all kept for the backward pass)."""
    with torch.device("meta"):
        m = RCN(cfg)
    enc_uhat = cfg.enc_primary_caps() * cfg.n_classes * cfg.class_caps_dim
    dec_uhat = cfg.dec_primary_caps() * cfg.dec_caps * cfg.dec_caps_dim
    return {
        "params": _n_params(m), "encoder_params": _n_params(m.encoder), "decoder_params": _n_params(m.decoder),
        "enc_primary_caps": cfg.enc_primary_caps(), "dec_primary_caps": cfg.dec_primary_caps(),
        "enc_u_hat_per_image": enc_uhat, "dec_u_hat_per_image_step": dec_uhat,
        "enc_u_hat_bytes": 4 * batch * enc_uhat, "dec_u_hat_bytes_all_steps": 4 * batch * dec_uhat * cfg.T,
    }
