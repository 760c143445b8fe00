"""The speed settings of a training step, chosen in one place for `rcn train` and `rcn bench`.

`choose(device, ...)` decides, `apply(settings)` sets torch's global switches, and
`prepare(model, settings)` lays the model out. The loop (rcn_dist/loop.py setup_run, the
backends) and the benchmarks (rcn_dist/bench) both call these, so that a benchmark row measures
what training runs. docs/performance.md has the measurements behind each choice.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rcn_dist.model.rcn import Decoder, Encoder


@dataclass(frozen=True)
class Speed:
    """What a training step runs with on one device."""

    tf32: bool
    """TF32 matmuls and convolutions (CUDA): fp32 storage, 10-bit mantissa products; 2-3x on the
    capsule convolutions of an H100/H200 in fp32 runs. No effect on the CPU."""
    cudnn_benchmark: bool
    """cuDNN picks the fastest convolution algorithm per shape (the shapes of a run are static)."""
    channels_last: bool
    """Convolution weights and images in NHWC: bf16 channels-last convolutions measured 2-3x the
    NCHW rate on the GPU (docs/performance.md); on the CPU it costs reorders and is off."""
    fused_adam: bool
    """torch's fused Adam kernel (CPU and CUDA): one kernel for all parameters (3x the per-tensor
    loop on the CPU for 4 M parameters)."""
    deterministic: bool
    """Deterministic cuDNN and torch.use_deterministic_algorithms: what bit-exact resume on a GPU
    needs (train.deterministic). Turns cudnn_benchmark off."""
    compile: str = "off"
    """"off", "steps": torch.compile of the encoder and decoder step functions, one graph each
    reused at every drawing step (train.compile)."""
    cuda_graphs: bool = False
    """Replay the compiled steps' forward and backward as CUDA graphs (train.cuda_graphs; CUDA only)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose(device: str | torch.device, deterministic: bool = False, compile: str = "off",
           cuda_graphs: bool = False) -> Speed:
    """The settings for a step on `device` (train.deterministic, train.compile, train.cuda_graphs)."""
    cuda = torch.device(device).type == "cuda"
    return Speed(tf32=cuda, cudnn_benchmark=cuda and not deterministic, channels_last=cuda, fused_adam=True,
                 deterministic=deterministic, compile="steps" if cuda_graphs else compile,
                 cuda_graphs=cuda_graphs)


def apply(s: Speed) -> None:
    """Set torch's process-wide switches for `s` (before the first CUDA kernel)."""
    torch.backends.cuda.matmul.allow_tf32 = s.tf32
    torch.backends.cudnn.allow_tf32 = s.tf32
    torch.backends.cudnn.benchmark = s.cudnn_benchmark
    torch.backends.cudnn.deterministic = s.deterministic
    if s.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; read when cuBLAS starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(s.deterministic)


def prepare(model: nn.Module, s: Speed) -> nn.Module:
    """Lay `model` out for `s` (channels-last weights) and compile its RCN's drawing steps; in place."""
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    if s.compile == "steps":
        compile_steps(model, cuda_graphs=s.cuda_graphs)
    return model


def compile_steps(model: nn.Module, cuda_graphs: bool = False) -> None:
    """torch.compile Encoder.step and Decoder.step of every RCN stack inside `model`, in place.

    A drawing step has the same shapes at every t, so each compiles to one graph (forward and
    backward) that the T steps reuse: the T-step loop stays in Python, and compile time does
    not grow with T. With `cuda_graphs`, mode="reduce-overhead": inductor records each graph
    once as a CUDA graph and replays it, one launch for the step's kernels.
    """
    mode = "reduce-overhead" if cuda_graphs else None
    for mod in model.modules():
        if isinstance(mod, (Encoder, Decoder)) and not getattr(mod, "_compiled_step", False):
            # An instance attribute shadows the method; the weights stay the module's own.
            mod.step = torch.compile(mod.step, dynamic=False, mode=mode)
            mod._compiled_step = True


def step_begins(s: Speed) -> None:
    """Before a micro-batch's forward: with CUDA graphs, a new generation of recorded graphs (the
    previous micro-batch's outputs and saved activations are no longer needed)."""
    if s.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
