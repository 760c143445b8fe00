"""The one configuration tree of rcn_dist.

Every knob of a run lives here: dataclasses with a docstring under each field, checked in
``__post_init__``. A config is built from a named preset, then a file (JSON or TOML, parsed as
data, never evaluated), then ``section.field=value`` overrides from the command line, in that
order ("CLI > file > preset").

    >>> from rcn_dist.config import preset
    >>> cfg = preset("tiny")
    >>> cfg = apply_overrides(cfg, ["model.T=6", "train.lr=3e-3"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcn_dist.errors import RcnError


class ConfigError(RcnError, ValueError):
    """A configuration value is wrong; the message names the field."""


def _require(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config field {name}: {msg}")


def _choice(value: Any, name: str, options: tuple) -> None:
    *head, last = map(repr, options)
    _require(value in options, name, f"must be {', '.join(head)} or {last}, got {value!r}")


def _ints(cfg: Any, section: str, low: int, *names: str) -> None:
    """Each named field is an integer >= low (1: positive, 0: non-negative)."""
    kind = "positive" if low else "non-negative"
    for name in names:
        v = getattr(cfg, name)
        _require(isinstance(v, int) and v >= low, f"{section}.{name}", f"must be a {kind} integer, got {v!r}")


@dataclass
class ModelConfig:
    """The Recurrent Capsule Network's shape (see docs/model.md)."""

    in_channels: int = 1
    """Image channels: 1 for (Fashion-)MNIST, 3 for CIFAR-10."""
    height: int = 28
    """Image height in pixels."""
    width: int = 28
    """Image width in pixels."""
    n_classes: int = 10
    """Number of class capsules in the encoder (one per class)."""
    T: int = 64
    """Number of drawing steps (DRAW's T)."""
    rnn: str = "lstm"
    """Recurrent cell of encoder and decoder: "lstm" (the paper) or "gru" (its section 9)."""
    enc_hidden: int = 256
    """Hidden size of the encoder RNN."""
    dec_hidden: int = 256
    """Hidden size of the decoder RNN."""
    z_dim: int = 100
    """Size of the Gaussian latent z_t drawn at every step."""
    enc_read: str = "on"
    """What RNN_enc reads besides the class capsules and h_dec(t-1): "on", DRAW's read of x and the
    error image x - sigmoid(c_{t-1}) (a glimpse, or the whole images without read_attn); "off",
    nothing else, the encoder RNN's inputs as the paper lists them (the capsules, h_dec(t-1) and
    its own state), so that the capsules alone carry the image to the encoder."""
    read_attn: bool = True
    """Use DRAW's Gaussian-filterbank read; off: the encoder reads the whole image and error image."""
    read_n: int = 2
    """Read window is read_n x read_n (DRAW MNIST: 2)."""
    write_attn: bool = True
    """Use DRAW's Gaussian-filterbank write; off: each step writes the whole canvas."""
    write_n: int = 5
    """Write window is write_n x write_n (DRAW MNIST: 5)."""

    # Encoder capsules: conv -> conv -> primary capsules -> class capsules (routing).
    enc_conv_channels: tuple[int, ...] = (256, 128)
    """Channels of the encoder's convolutions before the primary capsules (paper: 256, 128)."""
    enc_conv_kernel: int = 5
    """Kernel size of those convolutions (paper: 5, stride 1)."""
    enc_primary_types: int = 32
    """Number of primary capsule types (channels of capsules) in the encoder."""
    enc_primary_dim: int = 8
    """Dimension of each encoder primary capsule."""
    enc_primary_kernel: int = 9
    """Kernel of the primary-capsule convolution (Sabour et al.: 9)."""
    enc_primary_stride: int = 2
    """Stride of the primary-capsule convolution (Sabour et al.: 2)."""
    class_caps_dim: int = 16
    """Dimension of each class capsule."""
    routing_iters: int = 3
    """Dynamic-routing iterations r."""

    # Decoder capsules, run at every step: z -> seed map -> 2 deconvs -> primary caps -> caps.
    dec_seed_channels: int = 32
    """Channels of the feature map that a linear layer makes from z_t before the deconvolutions."""
    dec_seed_size: int = 8
    """Spatial size (square) of that seed map."""
    dec_deconv_channels: tuple[int, ...] = (128, 256)
    """Channels of the decoder's two transposed convolutions (paper: 128, 256)."""
    dec_deconv_kernel: int = 5
    """Kernel of the transposed convolutions (stride 1: each grows the map by kernel - 1)."""
    dec_primary_types: int = 32
    """Number of primary capsule types in the decoder."""
    dec_primary_dim: int = 8
    """Dimension of each decoder primary capsule."""
    dec_primary_kernel: int = 9
    """Kernel of the decoder's primary-capsule convolution."""
    dec_primary_stride: int = 2
    """Stride of the decoder's primary-capsule convolution."""
    dec_caps: int = 10
    """Number of capsules in the decoder's final capsule layer."""
    dec_caps_dim: int = 16
    """Dimension of each capsule of the decoder's final capsule layer."""
    dec_z_skip: bool = False
    """Also feed z_t itself to RNN_dec beside the capsule output (DRAW feeds z_t). Off: the paper's
    reading, RNN_dec sees z_t only through the decoder capsules (on, they fade: docs/model.md)."""
    enc_capsules: bool = True
    """The encoder capsule network. False (an ablation): RNN_enc gets no capsule input and the
    model has no classifier (margin 0, test error reported as undefined)."""
    dec_capsules: bool = True
    """The decoder capsule network. False (an ablation, DRAW's decoder): z_t goes straight to RNN_dec."""
    dec_caps_odd: bool = True
    """Make the decoder capsule network an odd function of z_t (no biases, tanh between layers), so
    that it cannot settle into a constant that carries nothing (docs/model.md). False: ReLU, biases."""
    dec_caps_norm: bool = True
    """Layer-normalise the routed decoder capsules, flattened to (B, dec_caps * dec_caps_dim),
    before RNN_dec, with a learned gain and no bias (so the network stays odd in z_t). It acts on
    the routed capsules' output, so z_t still reaches RNN_dec only through them. Without it the
    strict model's test -ELBO after the quickstart's 2,500 steps is 7.2 nats behind the skip
    model's; with it 3.1 (docs/model.md, item 18)."""
    caps_init: str = "scaled"
    """Initial weights of both capsule networks: "scaled" (capsule lengths O(1) from the first step)
    or "torch" (PyTorch's defaults: lengths ~1e-5..1e-3 at paper size, where the squash is flat;
    docs/model.md)."""

    likelihood: str = "bernoulli"
    """D(x | c_T): "bernoulli" on binarised data (nats), or "logistic", a discretised logistic with
    256 bins per sub-pixel and a learned scale per channel (CIFAR-10; reported in bits/dim too)."""
    margin_weight: float = 100.0
    """Weight of the margin loss against the ELBO (which is hundreds of nats per image)."""
    m_plus: float = 0.9
    """Margin loss: a present class should have capsule length above m_plus."""
    m_minus: float = 0.1
    """Margin loss: an absent class should have capsule length below m_minus."""
    margin_lambda: float = 0.5
    """Margin loss: down-weighting of the absent-class term."""

    def __post_init__(self) -> None:
        # Every int field of the model is a size or a count.
        _ints(self, "model", 1, *(f.name for f in dataclasses.fields(self) if f.type == "int"))
        _choice(self.in_channels, "model.in_channels", (1, 3))
        _require(self.n_classes >= 2, "model.n_classes", "must be at least 2")
        _choice(self.rnn, "model.rnn", ("lstm", "gru"))
        _choice(self.caps_init, "model.caps_init", ("scaled", "torch"))
        _choice(self.enc_read, "model.enc_read", ("on", "off"))
        _require(self.enc_read == "on" or self.enc_capsules, "model.enc_read",
                 "off needs model.enc_capsules: without the capsules and the read, RNN_enc never sees the image")
        _choice(self.likelihood, "model.likelihood", ("bernoulli", "logistic"))
        for name in ("enc_conv_channels", "dec_deconv_channels"):
            channels = tuple(getattr(self, name))
            setattr(self, name, channels)
            _require(len(channels) >= 1 and all(c > 0 for c in channels), f"model.{name}",
                     "must be one or more positive channel counts")
        _require(self.margin_weight >= 0, "model.margin_weight", "must be >= 0")
        _require(0 <= self.m_minus < self.m_plus <= 1, "model.m_plus",
                 f"need 0 <= m_minus < m_plus <= 1, got m_minus={self.m_minus}, m_plus={self.m_plus}")
        # Every kernel must fit the map it slides over (the first one that does not is named).
        image = f"(image {self.height}x{self.width})"
        sizes = [min(hw) for hw in [(self.height, self.width), *self.enc_conv_maps()]]
        for i, size in enumerate(sizes[:-1]):
            self._fits("enc_conv_kernel", size, f"it meets at encoder convolution {i + 1} {image}")
        self._fits("enc_primary_kernel", sizes[-1], f"it meets after the encoder convolutions {image}")
        self._fits("dec_primary_kernel", self.dec_deconv_maps()[-1], "of the decoder")
        _require(not self.read_attn or self.read_n <= min(self.height, self.width), "model.read_n",
                 "read window larger than the image")
        _require(not self.write_attn or self.write_n <= min(self.height, self.width), "model.write_n",
                 "write window larger than the image")

    def _fits(self, name: str, size: int, where: str) -> None:
        k = getattr(self, name)
        _require(k <= size, f"model.{name}", f"kernel {k} is larger than the {size}x{size} map {where}")

    # Derived sizes: the one place the layer shapes are computed (the model, memory.py, the checks).
    def enc_conv_maps(self) -> list[tuple[int, int]]:
        """(h, w) of the map after each encoder convolution (stride 1, no padding)."""
        shrink, n = self.enc_conv_kernel - 1, len(self.enc_conv_channels)
        return [(self.height - i * shrink, self.width - i * shrink) for i in range(1, n + 1)]

    def enc_primary_grid(self) -> tuple[int, int]:
        """Spatial size (h, w) of the encoder's primary-capsule map."""
        (h, w), k, s = self.enc_conv_maps()[-1], self.enc_primary_kernel, self.enc_primary_stride
        return (h - k) // s + 1, (w - k) // s + 1

    def dec_deconv_maps(self) -> list[int]:
        """Side of the square map after each transposed convolution (stride 1: each adds kernel - 1)."""
        grow = self.dec_deconv_kernel - 1
        return [self.dec_seed_size + i * grow for i in range(1, len(self.dec_deconv_channels) + 1)]

    def dec_primary_grid(self) -> int:
        """Spatial size (square) of the decoder's primary-capsule map."""
        return (self.dec_deconv_maps()[-1] - self.dec_primary_kernel) // self.dec_primary_stride + 1

    def enc_primary_caps(self) -> int:
        """Number of encoder primary capsules (types x grid)."""
        gh, gw = self.enc_primary_grid()
        return self.enc_primary_types * gh * gw

    def dec_primary_caps(self) -> int:
        """Number of decoder primary capsules (types x grid)."""
        return self.dec_primary_types * self.dec_primary_grid() ** 2

    def enc_rnn_in(self) -> int:
        """Input size of RNN_enc: class capsules (if any), the glimpse (2 N x N windows per channel:
        x and the error image; both whole images without read attention; none with enc_read=off),
        h_dec."""
        c = self.in_channels
        glimpse = 2 * c * self.read_n**2 if self.read_attn else 2 * c * self.height * self.width
        glimpse *= self.enc_read == "on"
        return self.n_classes * self.class_caps_dim * self.enc_capsules + glimpse + self.dec_hidden

    def dec_rnn_in(self) -> int:
        """Input size of RNN_dec: the decoder capsules (and z_t with dec_z_skip), or z_t alone."""
        if not self.dec_capsules:
            return self.z_dim
        return self.dec_caps * self.dec_caps_dim + self.z_dim * self.dec_z_skip


@dataclass
class DataConfig:
    """Where the data comes from and how it is fed."""

    dir: str = "data/fashion-mnist"
    """A directory prepared by `rcn prepare` (shards + manifest.json), or where such a directory's
    files are served: an http(s) URL prefix, a `pipe:` shell command with {} for the file name,
    or a brace-expanded list of its shards (docs/data.md, "Shard URLs")."""
    cache_dir: str = ""
    """Node-local directory that keeps each shard after its first read, checksum-verified ("": no
    cache). Safe to share between the ranks and workers of one node."""
    binarize: str = "dynamic"
    """"dynamic" (a fresh Bernoulli draw per sample and epoch, seeded), "fixed" (threshold 0.5),
    or "none" (keep grey levels: for the logistic likelihood)."""
    caps_input: str = "grey"
    """What the encoder capsules (the classifier) see: "grey" (the image before binarisation, as
    CapsNet; docs/model.md) or "binarized". The RNNs and the likelihood see the binarised image."""
    num_workers: int = -1
    """DataLoader worker processes per rank; -1: 0 on a CPU (workers would compete with the
    training threads for its cores), 2 on a GPU (decoding and binarising overlap the step), fewer
    where the shards do not go round (rcn_dist.loop.loader_workers)."""
    shuffle: bool = True
    """Shuffle shards and samples, seeded by (seed, epoch)."""

    def __post_init__(self) -> None:
        _choice(self.binarize, "data.binarize", ("dynamic", "fixed", "none"))
        _choice(self.caps_input, "data.caps_input", ("grey", "binarized"))
        _ints(self, "data", -1, "num_workers")


@dataclass
class TrainConfig:
    """Optimisation. Batch sizes, precision, clipping and LR live here, not in the DeepSpeed JSON."""

    steps: int = 10000
    """Optimizer steps to train for."""
    batch_size: int = 64
    """Global batch: micro_batch x grad_accum x data-parallel world size."""
    micro_batch: int = 0
    """Per-rank micro-batch; 0 derives it from batch_size, grad_accum and the world size."""
    grad_accum: int = 1
    """Gradient-accumulation steps per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (Adam)."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    lr_schedule: str = "cosine"
    """"cosine" (to min_lr_ratio x lr at the last step) or "constant" after warm-up."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of lr for the cosine schedule."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    grad_clip: float = 10.0
    """Global gradient-norm clip; 0 disables."""
    precision: str = "auto"
    """"fp32", "bf16" (CPU and GPU), "fp16" (GPU only, with dynamic loss scaling), or "auto": what
    the DeepSpeed JSON enables, else fp32. An explicit value that the JSON contradicts is refused."""
    seed: int = 0
    """Seeds the weights, the data order, binarisation and the latent noise."""
    eval_every: int = 500
    """Evaluate on the test split every N steps (0: only at the end)."""
    eval_batches: int = 0
    """Batches of the test split per periodic evaluation (0: the whole split)."""
    ckpt_every: int = 500
    """Checkpoint every N steps (and at the end and on a stop signal)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    compile: str = "off"
    """"off" or "steps": torch.compile the encoder and decoder step functions, one graph each
    reused at all T drawing steps (rcn_dist/speed.py; docs/performance.md has its speed and
    compile time). Not with ZeRO-3, whose parameter gathering hooks run inside the step."""
    cuda_graphs: bool = False
    """Replay the compiled drawing steps' forward and backward as CUDA graphs (implies
    compile=steps; GPU only, refused on the CPU): a launch-bound step then costs one launch per
    graph instead of one per kernel."""
    deterministic: bool = False
    """Deterministic algorithms (cuDNN without autotuning, torch.use_deterministic_algorithms):
    what bit-exact resume on a GPU costs (docs/training.md). The CPU path is deterministic anyway."""
    loggers: str = "jsonl"
    """Comma-separated metric sinks (rank 0): "jsonl" (RUN_DIR/metrics.jsonl, always written: eval
    and report read it), "tensorboard" (RUN_DIR/tensorboard/, needs `pip install
    rcn_dist[tensorboard]`), "wandb" (offline, in RUN_DIR/wandb/; needs wandb; `wandb sync` uploads)."""

    def __post_init__(self) -> None:
        _ints(self, "train", 1, "steps", "batch_size", "grad_accum", "keep_last", "log_every")
        _ints(self, "train", 0, "micro_batch", "warmup_steps", "eval_every", "eval_batches", "ckpt_every")
        _require(self.lr > 0, "train.lr", f"must be positive, got {self.lr}")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _choice(self.precision, "train.precision", ("auto", "fp32", "bf16", "fp16"))
        _choice(self.lr_schedule, "train.lr_schedule", ("cosine", "constant"))
        _choice(self.compile, "train.compile", ("off", "steps"))
        unknown = {n.strip() for n in self.loggers.split(",") if n.strip()} - {"jsonl", "tensorboard", "wandb"}
        _require(not unknown, "train.loggers",
                 f"unknown logger(s) {', '.join(sorted(unknown))}: use jsonl, tensorboard, wandb")


@dataclass
class ParallelConfig:
    """How the model is spread over processes (data parallelism comes from the world size).

    The layout's own fields are checked by the layout (rcn_dist.parallel.layouts), not here: a
    new layout needs no change to this file."""

    layout: str = "auto"
    """The registered layout (rcn_dist.parallel.layouts) that trains the run: "deepspeed" (the whole
    model in one DeepSpeed engine per rank), "pipeline" (the 2-stage split), or "auto", the one
    for pipeline_stages (1: deepspeed, 2: pipeline)."""
    pipeline_stages: int = 1
    """1: every rank holds the whole model. 2: encoder stack on one rank, decoder on the next."""
    micro_batches: int = 1
    """Micro-batches in flight through the pipeline per step (pipeline_stages = 2 only)."""
    zero_stage: int = -1
    """ZeRO stage; -1 takes it from the DeepSpeed JSON (0 when there is none)."""
    pipeline_schedule: str = "async_bfs"
    """Schedule of the 2T virtual stages (docs/parallelism.md): training runs "async_bfs" (ours);
    the pipeline benchmark also runs torch's lock-step "looped_bfs" and "interleaved_1f1b"."""

    def __post_init__(self) -> None:
        _choice(self.pipeline_schedule, "parallel.pipeline_schedule",
                ("async_bfs", "looped_bfs", "interleaved_1f1b"))
        _ints(self, "parallel", 1, "pipeline_stages", "micro_batches")
        _require(isinstance(self.layout, str) and self.layout.strip() == self.layout != "", "parallel.layout",
                 f"must be a layout's name or \"auto\", got {self.layout!r}")
        _choice(self.zero_stage, "parallel.zero_stage", (-1, 0, 1, 2, 3))


@dataclass
class EvalConfig:
    """`rcn eval` and `rcn sample`."""

    iw_samples: int = 50
    """K of the importance-weighted bound."""
    iw_examples: int = 1000
    """Test images used for the importance-weighted bound (0: all)."""
    caps_examples: int = 0
    """Test images behind the capsule-usage figures of `rcn eval` (0: all)."""
    info_examples: int = 0
    """Test images behind the rate per step and the active units (0: all); two posterior paths each."""
    mi_examples: int = 4096
    """Test images behind the I_q(x; z) estimates, in mixtures of eval.mi_batch (0: all)."""
    mi_batch: int = 2048
    """Posteriors per mixture of the I_q(x; z) estimates: the lower one cannot exceed log(mi_batch)."""
    mi_paths: int = 128
    """Posterior paths per mixture, from its first images: each runs mi_batch encoder passes, so a
    mixture costs mi_paths * mi_batch of them (docs/evaluation.md says why not mi_batch^2)."""
    nn_samples: int = 1000
    """Generated samples (and as many test images) behind the nearest-neighbour and data-copying
    figures."""
    nn_train_images: int = 0
    """Training images searched for nearest neighbours (0: all)."""
    copy_cells: int = 10
    """k-means cells of the data-copying test (Meehan et al. 2020), fitted on training images."""
    fd_samples: int = 5000
    """Generated samples (and as many test and training images) behind the Frechet distance, the
    class histogram and the write-window figures."""
    fd_bootstrap: int = 100
    """Bootstrap resamples of the Frechet distance's interval (0: no interval)."""
    classifier_steps: int = 1300
    """Steps (batch 128) of the data set's feature classifier, about 3 epochs of Fashion-MNIST's
    55,000 training images; trained once per data set and cached (rcn_dist.quality)."""
    c2st_samples: int = 5000
    """Generated samples (and as many test images) in the classifier two-sample test, half of
    each to train it, half to score it; the real-against-real control tests those test images
    against as many others (capped at half the test split)."""

    def __post_init__(self) -> None:
        _ints(self, "eval", 1, "iw_samples", "nn_samples", "classifier_steps", "copy_cells", "fd_samples",
              "c2st_samples")
        _ints(self, "eval", 0, "iw_examples", "caps_examples", "nn_train_images", "info_examples", "mi_examples",
              "fd_bootstrap")
        _require(isinstance(self.mi_batch, int) and self.mi_batch >= 2, "eval.mi_batch",
                 f"must be an integer >= 2, got {self.mi_batch!r}")
        _require(isinstance(self.mi_paths, int) and 1 <= self.mi_paths <= self.mi_batch, "eval.mi_paths",
                 f"must be an integer from 1 to eval.mi_batch ({self.mi_batch}), got {self.mi_paths!r}")
        _require(self.mi_examples == 0 or self.mi_examples >= self.mi_batch, "eval.mi_examples",
                 f"must be 0 (all) or at least eval.mi_batch ({self.mi_batch}), got {self.mi_examples}")
        _require(self.c2st_samples >= 4, "eval.c2st_samples", "must be at least 4 (two per half and set)")


@dataclass
class Config:
    """The whole run."""

    name: str = "custom"
    """The preset (or file) this config came from; informational."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data path."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and the loop."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Pipeline split and ZeRO."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation and sampling."""

    def __post_init__(self) -> None:
        _require(self.model.likelihood != "logistic" or self.data.binarize == "none", "data.binarize",
                 "the logistic likelihood models grey levels: set data.binarize=none")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
            "parallel": ParallelConfig, "eval": EvalConfig}


_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}
_EXPECTED = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Turn a parsed value (or a CLI string) into the field's declared type, or refuse."""
    if getattr(typ, "__origin__", None) is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {name}: expected a list, got {value!r}")
        return tuple(_coerce(v, int, name) for v in value)
    if typ is bool and isinstance(value, str):
        value = _BOOLS.get(value.lower(), value)
    if typ in (bool, str) and isinstance(value, typ):
        return value
    # An int field takes an integral number or its digits, never a bool or 2.5.
    integral = not isinstance(value, bool) and not (isinstance(value, float) and not value.is_integer())
    if typ is float or (typ is int and integral):
        with contextlib.suppress(TypeError, ValueError):
            return typ(value)
    raise ConfigError(f"config field {name}: expected {_EXPECTED[typ]}, got {value!r}")


def from_dict(d: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from a nested dict laid over `base` (default: the dataclass defaults); unknown
    sections or keys are refused, naming them."""
    cur = base.to_dict() if base is not None else Config().to_dict()
    for key, val in d.items():
        if key == "name":
            cur["name"] = _coerce(val, str, "name")
            continue
        if key not in SECTIONS:
            raise ConfigError(f"unknown config section {key!r} (known: name, {', '.join(SECTIONS)})")
        if not isinstance(val, dict):
            raise ConfigError(f"config section {key!r} must be a table/object, got {type(val).__name__}")
        types = typing.get_type_hints(SECTIONS[key])
        for k, v in val.items():
            if k not in types:
                raise ConfigError(f"unknown config key {key}.{k}")
            cur[key][k] = _coerce(v, types[k], f"{key}.{k}")
    return Config(name=cur["name"], **{s: cls(**cur[s]) for s, cls in SECTIONS.items()})


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` strings (as typed on a command line)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] == "name":
            nested["name"] = value
            continue
        if len(parts) != 2:
            raise ConfigError(f"override key {key!r} must be section.field (e.g. train.lr)")
        nested.setdefault(parts[0], {})[parts[1]] = value
    return from_dict(nested, base=cfg)


def model_diff(saved: Path, cfg: Config) -> list[str]:
    """The model.* fields in which a saved config.json differs from `cfg` ([] without one)."""
    if not saved.is_file():
        return []
    try:
        old = json.loads(saved.read_text()).get("model", {})
    except (ValueError, AttributeError):
        raise ConfigError(f"{saved}: not a valid config file") from None
    new = json.loads(cfg.to_json())["model"]
    return sorted(k for k in new if old.get(k) != new[k])


def load_file(path: str | Path) -> dict[str, Any]:
    """Parse a JSON or TOML config file as data (never evaluated)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    if p.suffix not in (".json", ".toml"):
        raise ConfigError(f"config file {p}: unsupported format {p.suffix!r} (use .json or .toml)")
    text = p.read_bytes()
    try:
        obj = tomllib.loads(text.decode("utf-8")) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} does not parse: {e}") from None
    if not isinstance(obj, dict):  # a TOML file always is one
        raise ConfigError(f"config file {p}: the top level must be an object")
    return obj


# ---------------------------------------------------------------- presets
def _tiny() -> Config:
    return Config(
        name="tiny",
        model=ModelConfig(
            T=4, enc_hidden=32, dec_hidden=32, z_dim=8, read_n=3, write_n=3,
            enc_conv_channels=(16, 16), enc_primary_types=4, enc_primary_dim=4, class_caps_dim=8,
            dec_seed_channels=4, dec_seed_size=4, dec_deconv_channels=(8, 16), dec_primary_types=4,
            dec_primary_dim=4, dec_primary_kernel=5, dec_caps=4, dec_caps_dim=8, margin_weight=50.0,
        ),
        train=TrainConfig(steps=20, batch_size=16, lr=3e-3, warmup_steps=0, eval_every=10,
                          eval_batches=2, ckpt_every=10),
    )


def _small() -> Config:
    # The CPU quickstart: 2 cores, minutes. Capsules narrow, few steps, no paper sizes.
    return Config(
        name="small",
        model=ModelConfig(
            T=8, enc_hidden=128, dec_hidden=128, z_dim=16, read_n=5, write_n=5,
            enc_conv_channels=(32, 32), enc_primary_types=16, enc_primary_dim=8,
            dec_seed_channels=8, dec_seed_size=4, dec_deconv_channels=(16, 32), dec_primary_types=8,
            dec_primary_dim=8, dec_primary_kernel=5, dec_caps=8, dec_caps_dim=8, margin_weight=500.0,
        ),
        train=TrainConfig(steps=2500, batch_size=64, lr=2e-3, warmup_steps=50, eval_every=500,
                          eval_batches=20, ckpt_every=250),
    )


def _mnist() -> Config:
    # The paper's sizes (section 7) and DRAW's MNIST values where the paper gives none.
    return Config(name="mnist", data=DataConfig(dir="data/mnist"),
                  train=TrainConfig(steps=50000, batch_size=128, lr=1e-3))


def _cifar10() -> Config:
    return Config(
        name="cifar10",
        model=ModelConfig(in_channels=3, height=32, width=32, likelihood="logistic",
                          enc_hidden=400, dec_hidden=400, z_dim=200, read_n=5, write_n=5),
        data=DataConfig(dir="data/cifar10", binarize="none"),
        train=TrainConfig(steps=100000, batch_size=128, lr=1e-3),
    )


def _multimnist() -> Config:
    return dataclasses.replace(_mnist(), name="multimnist", model=ModelConfig(height=36, width=36),
                               data=DataConfig(dir="data/multimnist"))


PRESETS = {"tiny": _tiny, "small": _small, "mnist": _mnist, "cifar10": _cifar10,
           "multimnist": _multimnist}


def preset(name: str) -> Config:
    """A fresh copy of a named preset: tiny (tests), small (CPU quickstart), mnist, cifar10,
    multimnist (the paper's sizes, for GPUs)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


def resolve(preset_name: str | None = None, file: str | Path | None = None,
            overrides: list[str] | None = None) -> Config:
    """Preset, then file, then overrides. A file may name its own base with `preset = "..."`."""
    d = load_file(file) if file is not None else {}
    base_name = d.pop("preset", None)
    name = preset_name or base_name
    cfg = preset(name) if name else Config()
    return apply_overrides(from_dict(d, base=cfg), overrides or [])
