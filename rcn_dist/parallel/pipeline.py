"""Pipeline parallelism: the encoder stack on one rank, the decoder stack on the next.

The T steps are unrolled into 2T virtual stages enc_1, dec_1, ..., enc_T, dec_T, virtual stage i
on pipeline rank i % 2 (async_schedule.AsyncLoopedBFS): rank 0 runs every enc_t with its one
Encoder, rank 1 every dec_t with its one Decoder, and dec_T computes the unsplit model's loss
terms. docs/parallelism.md has the schedule, what travels between stages, and the measurements.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from rcn_dist import speed
from rcn_dist.config import Config, ConfigError
from rcn_dist.errors import CheckpointError
from rcn_dist.evaluation import caps_input, evaluate
from rcn_dist.model import RCN, Carry, RCNOutput, kl_standard_normal
from rcn_dist.model.losses import TERMS
from rcn_dist.model.precision import wide_dtype
from rcn_dist.parallel import checkpoint as ckpt
from rcn_dist.parallel import collectives
from rcn_dist.parallel.async_schedule import AsyncLoopedBFS
from rcn_dist.parallel.engine import build_adam, lr_lambda
from rcn_dist.parallel.env import RankLayout
from rcn_dist.parallel.layouts import LayoutParts, LayoutSpec, Run, register
from rcn_dist.parallel.safety import safe_torch_load

ZERO_STAGES = (0, 1)


def check_pipeline_config(cfg: Config, launch) -> None:
    """Refuse, before any process group starts, what the pipeline cannot run (one line each).

    `cfg` has been through engine.resolve_engine_settings (micro_batch and zero_stage filled in);
    `launch` is the rank's LaunchEnv. The checkpoint to resume is checked by `check_resume`.
    """
    parallel, train = cfg.parallel, cfg.train
    micro_batches = parallel.micro_batches
    if parallel.pipeline_stages != 2:
        raise ConfigError(f"parallel.pipeline_stages={parallel.pipeline_stages}: the pipeline has exactly 2 stages")
    if not (cfg.model.enc_capsules and cfg.model.dec_capsules):
        raise ConfigError("config field parallel.pipeline_stages: the pipeline split needs both capsule networks "
                          "(model.enc_capsules and model.dec_capsules are ablations for one stage)")
    if parallel.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"parallel.zero_stage={parallel.zero_stage} cannot shard a pipeline: "
                          "with pipeline_stages=2 use ZeRO stage 0 or 1")
    if train.precision == "fp16":
        raise ConfigError("train.precision=fp16 is not supported with pipeline_stages=2 (no loss scaling "
                          "across stages): use bf16 or fp32")
    if launch.world_size % 2:
        raise ConfigError(f"world size {launch.world_size} is not divisible by parallel.pipeline_stages=2")
    if train.micro_batch % micro_batches:
        raise ConfigError(f"the per-pipeline batch train.micro_batch={train.micro_batch} is not divisible by "
                          f"parallel.micro_batches={micro_batches}")
    if parallel.pipeline_schedule != "async_bfs":
        raise ConfigError(f"parallel.pipeline_schedule={parallel.pipeline_schedule}: torch's lock-step schedules "
                          "are for comparison in the pipeline benchmark (rcn_dist.bench.pipeline) only; train with "
                          "async_bfs")


def check_resume(d: Path, cfg: Config, launch) -> None:
    """The checkpoint a pipeline run resumes from (LayoutSpec.check_resume)."""
    _check_resumable(d, launch)


def _check_resumable(d: Path, launch) -> None:
    summary = ckpt.saved_layout(d)
    if summary.get("pipeline_stages", 1) != 2:
        raise CheckpointError(f"{d} was written by an unsplit run (parallel.pipeline_stages=1): the pipeline "
                              "does not resume it; train on a new --out (rcn eval / rcn sample read it as is)")
    if summary.get("world_size") != launch.world_size:
        raise CheckpointError(f"{d} was written by {summary.get('world_size')} ranks, this run has "
                              f"{launch.world_size}: resume a pipeline checkpoint with the same layout")


def _autocast(device: torch.device, on: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


def carried(src: str, t: int, T: int) -> tuple[str, ...]:
    """The Carry fields that cross the boundary after virtual stage `src`_t ("enc" or "dec", t
    counted from 0) of T steps: the one place that says what travels (docs/parallelism.md).

    enc_t -> dec_t: the encoder state (not after the last encoder step), caps and KL, the decoder
    state and canvas from t = 1 on (at t = 0 dec_0 starts from zeros), z_t.
    dec_t -> enc_t+1 (t < T - 1): everything but z."""
    if src == "dec":
        return ("enc_state", "caps", "kl", "dec_state", "canvas")
    enc_state = ("enc_state",) if t < T - 1 else ()
    dec_side = ("dec_state", "canvas") if t > 0 else ()
    return (*enc_state, "caps", "kl", *dec_side, "z")


class EncoderStep(nn.Module):
    """Virtual stage enc_t (t counted from 0) around the rank's one Encoder."""

    def __init__(self, encoder: nn.Module, t: int, T: int, bf16: bool) -> None:
        super().__init__()
        self.encoder, self.t, self.T, self.bf16 = encoder, t, T, bf16
        self.state_size = 2 if encoder.cfg.rnn == "lstm" else 1
        self.inputs = carried("dec", t - 1, T) if t > 0 else ()
        self.outputs = carried("enc", t, T)

    def forward(self, *carry: Tensor, x: Tensor, eps: Tensor, caps: Tensor | None = None) -> tuple[Tensor, ...]:
        """carry: the flat Carry from dec_{t-1} (nothing at t = 0); caps: the class capsules
        (B, K*D) when computed outside (our schedules), else None. Returns the flat Carry for dec_t."""
        enc = self.encoder
        # x and eps in fp32 at least (fp64 for the fp64 parity tests), never rounded to a bf16 stack.
        dtype = wide_dtype(enc.latent.weight.dtype)
        x = x.to(dtype)
        with _autocast(x.device, self.bf16):
            if self.t == 0:
                # Image -> class capsules runs once; the decoder's zero state and canvas are implied.
                caps = enc.capsules(x).flatten(1) if caps is None else caps
                c = Carry(enc_state=enc.init_state(x.shape[0], x), caps=caps, kl=x.new_zeros(x.shape[0]))
                h_dec, canvas = x.new_zeros(x.shape[0], enc.cfg.dec_hidden), torch.zeros_like(x)
            else:
                c = Carry.from_tensors(carry, self.inputs, self.state_size)
                h_dec, canvas = c.h_dec, c.canvas
            state, z, mu, logvar, _ = enc.step(x, c.caps, canvas, h_dec, c.enc_state, eps[:, self.t].to(dtype))
            kl = c.kl + kl_standard_normal(mu, logvar)
        return replace(c, enc_state=state, kl=kl, z=z).tensors(self.outputs)


class DecoderStep(nn.Module):
    """Virtual stage dec_t around the rank's one Decoder; dec_T returns the loss terms (B, 6)."""

    def __init__(self, decoder: nn.Module, t: int, T: int, bf16: bool) -> None:
        super().__init__()
        self.decoder, self.t, self.T, self.bf16 = decoder, t, T, bf16
        self.state_size = 2 if decoder.cfg.rnn == "lstm" else 1
        self.inputs = carried("enc", t, T)
        self.outputs = carried("dec", t, T) if t < T - 1 else ()

    def forward(self, *carry: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, ...] | Tensor:
        """carry: the flat Carry from enc_t. Returns the flat Carry for enc_{t+1}, or at the last
        step the loss terms (B, 6)."""
        dec, last = self.decoder, self.t == self.T - 1
        dtype = wide_dtype(dec.rnn.weight_hh.dtype)
        x = x.to(dtype)
        c = Carry.from_tensors(carry, self.inputs, self.state_size)
        if self.t == 0:
            state, canvas = dec.init_state(x.shape[0], x), torch.zeros_like(x)
        else:
            state, canvas = c.dec_state, c.canvas
        with _autocast(x.device, self.bf16):
            state, canvas, _ = dec.step(c.z, state, canvas)
        if not last:
            return replace(c, dec_state=state, canvas=canvas, z=None).tensors(self.outputs)
        cfg = dec.cfg
        class_caps = c.caps.view(-1, cfg.n_classes, cfg.class_caps_dim)
        out = RCNOutput(canvas=canvas.unsqueeze(1), last_canvas=canvas, class_caps=class_caps, class_lengths=class_caps.norm(dim=-1),
                        kl=c.kl.unsqueeze(1), mu=None, logvar=None, read_windows=None, write_windows=None)
        with _autocast(x.device, self.bf16):
            terms = dec.loss_terms(out, x, y.to(dtype) if y.is_floating_point() else y)
        # fp32 at least (as the unsplit loop's LossModule), fp64 when the stack is fp64.
        odt = torch.promote_types(dtype, torch.float32)
        return torch.stack([terms[k].to(odt) for k in TERMS] + [terms["correct"].to(odt)], 1)


def make_groups(world_size: int) -> tuple[Any, Any]:
    """(this rank's pipeline group, its data-parallel group). Collective: every rank calls it.

    Pipeline k is ranks (2k, 2k+1); the data-parallel group of stage s is ranks s, s+2, s+4, ...
    (env.RankLayout.groups, with 2 stages).
    """
    groups = RankLayout(world_size, dist.get_rank(), pipeline_stages=2).groups()
    return groups.pipeline, groups.data


class PipelineRank:
    """One rank's share of a 2-stage pipeline: its stack, its T virtual stages, the schedule, the
    optimizer (Adam on its own parameters; ZeRO-1 shards that state over the data-parallel group).

    The weights are the unsplit model's: RCN(cfg.model) is built under torch.manual_seed(seed)
    exactly as the plain loop does, and the other stack is dropped at once.
    """

    def __init__(self, cfg: Config, pp_rank: int, pp_group, dp_group=None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.cfg, self.pp_rank, self.pp_group, self.dp_group = cfg, pp_rank, pp_group, dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.device = torch.device(device)
        torch.manual_seed(cfg.train.seed)
        full = RCN(cfg.model)
        self.prefix = "encoder." if pp_rank == 0 else "decoder."
        self.stack: nn.Module = (full.encoder if pp_rank == 0 else full.decoder).to(device=self.device, dtype=dtype)
        del full
        T, bf16 = cfg.model.T, cfg.train.precision == "bf16"
        step_cls = EncoderStep if pp_rank == 0 else DecoderStep
        steps = [step_cls(self.stack, t, T, bf16) for t in range(T)]
        self.stage_modules: list[nn.Module] = steps
        """The T virtual stages of this rank (EncoderStep or DecoderStep, t = 0 .. T-1)."""
        self.events: list | None = None
        self.schedule = AsyncLoopedBFS(steps, pp_rank, pp_group, cfg.parallel.micro_batches, loss_fn=self._loss)
        self._denom = 1
        self.optimizer = build_adam(self.stack.parameters(), cfg.train.lr, cfg.train.weight_decay, fused=True,
                                    zero_group=dp_group if cfg.parallel.zero_stage == 1 else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))

    rcn = None
    """rcn_dist.evaluation.Evaluable: no whole RCN on a pipeline rank (no capsule figures)."""

    @property
    def training(self) -> bool:
        return self.stack.training

    def train(self, mode: bool = True) -> PipelineRank:
        """Training or evaluation mode of this rank's stack (what evaluate switches)."""
        self.stack.train(mode)
        return self

    def record_events(self, on: bool = True) -> list:
        """Start (or stop) logging stage forward/backward events; returns the (cleared) list."""
        self.events = [] if on else None
        self.schedule.events = self.events
        return self.events if on else []

    def named_parameters(self) -> dict[str, Tensor]:
        """This rank's parameters under their names in RCN.state_dict()."""
        return {self.prefix + k: p for k, p in self.stack.named_parameters()}

    def state_dict(self) -> dict[str, Tensor]:
        return {self.prefix + k: v for k, v in self.stack.state_dict().items()}

    def load_state_dict(self, full: dict[str, Tensor]) -> None:
        """Take this rank's stack from a full RCN state dict (other keys ignored)."""
        mine = {k.removeprefix(self.prefix): v for k, v in full.items() if k.startswith(self.prefix)}
        self.stack.load_state_dict(mine, strict=True)

    def _loss(self, out: Tensor, target: Tensor | None = None) -> Tensor:
        # torch's schedules (in the benchmark) pass a target, unused: the last stage computed the loss terms.
        return out[:, 0].sum() / self._denom

    def _micro_kwargs(self, kw: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        m = self.cfg.parallel.micro_batches
        parts = {k: v.chunk(m) for k, v in kw.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(m)]

    def _run(self, kw: dict[str, Tensor], train: bool) -> list[Tensor] | None:
        """The schedule over M micro-batches: the last stage's outputs per micro-batch on the
        decoder rank, None on the encoder rank. On the encoder rank the encoder capsules, which need
        only the image, run once over the rank's whole batch before the schedule (and their
        backward once after it): M small capsule passes cost a CPU thread 2-3x one big one, and
        as part of stage 0 they made the first round of every micro-batch the slowest."""
        x_caps = kw.pop("x_caps", None)  # what the capsules see (data.caps_input), if not x itself
        mbs = self._micro_kwargs(kw)
        caps = None
        if self.pp_rank == 0:
            x = kw["x"] if x_caps is None else x_caps
            t0 = time.time()
            with torch.set_grad_enabled(train), _autocast(x.device, self.cfg.train.precision == "bf16"):
                caps = self.stack.capsules(x.to(self.stack.latent.weight.dtype)).flatten(1)  # (B, K*D)
            self._log_caps("F", t0)
            for d, part in zip(mbs, caps.detach().chunk(len(mbs))):
                d["caps"] = part.requires_grad_(train)  # a leaf per micro-batch: stage 0's input
        out = self.schedule.run(mbs, train=train)
        if train and caps is not None:
            t0 = time.time()
            grads = [d["caps"].grad if d["caps"].grad is not None else torch.zeros_like(d["caps"]) for d in mbs]
            caps.backward(torch.cat(grads))
            self._log_caps("B", t0)
        return out

    def _log_caps(self, kind: str, t0: float) -> None:
        # The whole-batch capsule pass is stage 0's work, logged with micro-batch -1.
        if self.events is not None:
            self.events.append((kind, 0, -1, t0, time.time()))

    def _kwargs(self, x: Tensor, y: Tensor, eps: Tensor, x_caps: Tensor | None = None) -> dict[str, Tensor]:
        x = x.to(self.device)
        if self.pp_rank == 0:
            kw = {"x": x, "eps": eps.to(self.device)}
            return kw if x_caps is None else kw | {"x_caps": x_caps.to(self.device)}
        return {"x": x, "y": y.to(self.device)}

    def forward_backward(self, x: Tensor, y: Tensor, eps: Tensor, denom: int,
                         x_caps: Tensor | None = None) -> Tensor | None:
        """Run the schedule on one batch (B, ...) of this pipeline, accumulating gradients of
        sum(loss) / denom. Returns the per-sample terms (B, 6) on the decoder rank, else None.
        x_caps: what the encoder capsules see instead of x (RCN.forward)."""
        self._denom = denom
        out = self._run(self._kwargs(x, y, eps, x_caps), train=True)
        return None if out is None else torch.cat([o.detach() for o in out])

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor, eps: Tensor, x_caps: Tensor | None = None) -> dict[str, Tensor]:
        """Forward without gradients, called by rcn_dist.evaluation.evaluate (Evaluable): the per-sample
        terms on the decoder rank, zeros on the encoder rank (masked_on_encoder_rank: none count twice)."""
        out = self._run(self._kwargs(x, y, eps, x_caps), train=False)
        if out is None:
            # (B, 6) zeros on the rank's device, in the dtype the decoder rank's last stage returns
            # (fp32 at least): evaluate multiplies them by the mask on the device.
            odt = torch.promote_types(self.stack.latent.weight.dtype, torch.float32)
            out = torch.zeros(x.shape[0], len(TERMS) + 1, dtype=odt, device=self.device)
        else:
            out = torch.cat(out)
        return {k: out[:, i] for i, k in enumerate((*TERMS, "correct"))}

    def reduce_gradients(self) -> Tensor:
        """Average gradients over the data-parallel replicas; returns the global gradient norm
        (both stacks: the squared norms are summed over the pipeline)."""
        params = list(self.stack.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if self.dp_size > 1:
            # One all-reduce of one flat buffer, then back into the .grad tensors in place.
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat = collectives.all_reduce(flat, group=self.dp_group) / self.dp_size
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        # Per-tensor norms (no flat copy: for 4 M parameters the copy cost more than Adam).
        norms = torch.stack(torch._foreach_norm(grads)).to(torch.float64)
        sq = collectives.all_reduce(norms.pow(2).sum().reshape(1), group=self.pp_group)
        return sq.sqrt()[0]

    def optimizer_step(self, norm: Tensor) -> None:
        """Clip by the global norm (as torch's clip_grad_norm_), step Adam and the LR schedule."""
        clip = self.cfg.train.grad_clip
        if clip > 0:
            coef = clip / (float(norm) + 1e-6)
            if coef < 1:
                for p in self.stack.parameters():
                    p.grad.mul_(coef)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict[str, Any] | None:
        """Optimizer + LR schedule state to save: on data-parallel rank 0, None elsewhere
        (collective over the data-parallel group under ZeRO-1)."""
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            self.optimizer.consolidate_state_dict(to=0)
        if self.dp_group is not None and dist.get_rank(self.dp_group) != 0:
            return None
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}


def masked_on_encoder_rank(stream, pp_rank: int):
    """The eval stream with every sample masked out on the encoder rank (its terms are zeros)."""
    for b in stream:
        if pp_rank == 0:
            b = {**b, "mask": torch.zeros_like(b["mask"])}
        yield b


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(runner: PipelineRank, run_dir: Path, step: int, loop_state: dict[str, Any], cfg: Config,
                    launch, keep_last: int) -> Path:
    """Collective. checkpoint.commit with optim_stage{s}.pt per stack in place of DeepSpeed's files
    and model.safetensors holding the full RCN (both stacks merged by rank 0)."""
    def write_state(d: Path) -> None:
        opt = runner.optimizer_state()  # collective over the data-parallel group under ZeRO-1
        if launch.dp_rank == 0:  # this stack's weights, for rank 0 to merge
            part = {k: v.detach().float().contiguous().cpu() for k, v in runner.state_dict().items()}
            save_file(part, str(d / f"model_stage{launch.pp_rank}.safetensors"))
        if opt is not None:
            torch.save(opt, d / f"optim_stage{launch.pp_rank}.pt")

    def weights(d: Path) -> dict[str, Tensor]:
        collectives.barrier()  # both stacks' parts written
        if launch.rank != 0:
            return {}
        parts = [d / f"model_stage{s}.safetensors" for s in range(2)]
        merged = {k: v for p in parts for k, v in ckpt.read_safetensors(p).items()}
        for p in parts:
            p.unlink()
        return merged

    return ckpt.commit(run_dir, step, loop_state, cfg, launch.rank, launch.world_size, keep_last, write_state, weights,
                       layout={"pipeline_stages": 2, "micro_batches": cfg.parallel.micro_batches})


def load_checkpoint(runner: PipelineRank, d: Path, launch) -> dict[str, Any]:
    """Restore this rank's stack, optimizer, LR schedule and RNG; returns its loop state."""
    _check_resumable(d, launch)
    loop_file = d / f"loop_rank{launch.rank}.json"
    opt_file = d / f"optim_stage{launch.pp_rank}.pt"
    if not loop_file.is_file() or not opt_file.is_file():
        raise CheckpointError(f"{d}: no loop or optimizer state for rank {launch.rank}")
    runner.load_state_dict(ckpt.read_safetensors(d / "model.safetensors"))
    opt = safe_torch_load(opt_file)
    runner.optimizer.load_state_dict(opt["optimizer"])
    runner.scheduler.load_state_dict(opt["scheduler"])
    torch.set_rng_state(ckpt.read_safetensors(d / f"rng_rank{launch.rank}.safetensors")["cpu"])
    return ckpt.read_json(loop_file)


# ---------------------------------------------------------------- the layout
def build(run: Run) -> LayoutParts:
    """The "pipeline" layout on this rank: the encoder stack on even ranks, the decoder stack on
    odd ones; same rows, evaluation, checkpoints (model.safetensors holds the full RCN), stop
    protocol and exit codes as the deepspeed layout."""
    cfg, launch, out = run.cfg, run.launch, run.out
    train_cfg, parallel = cfg.train, cfg.parallel
    out.info(f"{launch.launcher}: {launch.world_size} rank(s) = {launch.dp_size} pipeline(s) x 2 stages, "
             f"{launch.backend} on {launch.device}; {cfg.name} preset, {parallel.pipeline_schedule} with "
             f"{parallel.micro_batches} micro-batch(es), ZeRO {parallel.zero_stage}, {train_cfg.precision}, "
             f"global batch {train_cfg.batch_size} = {train_cfg.micro_batch} x {train_cfg.grad_accum} x "
             f"{launch.dp_size}")
    runner = PipelineRank(cfg, launch.pp_rank, run.groups.pipeline, run.groups.data, device=launch.device)
    speed.prepare(runner.stack, run.speed)

    def forward_backward(batch: dict, eps: torch.Tensor, last: bool) -> torch.Tensor | None:
        speed.step_begins(run.speed)
        terms = runner.forward_backward(batch["image"], batch["label"], eps, train_cfg.micro_batch * train_cfg.grad_accum,
                                        x_caps=caps_input(batch, cfg, launch.device))
        # The decoder rank holds the loss terms; (5,) on the device.
        return None if terms is None else terms[:, :len(TERMS)].double().mean(0)

    def update() -> None:
        runner.optimizer_step(runner.reduce_gradients())

    return LayoutParts(
        forward_backward=forward_backward, update=update, lr=lambda: runner.scheduler.get_last_lr()[0],
        evaluate=lambda stream, max_batches: evaluate(
            runner, masked_on_encoder_rank(stream, launch.pp_rank), cfg, launch.device, max_batches),
        save=lambda step, loop_state: save_checkpoint(runner, run.run_dir, step, loop_state, cfg, launch,
                                                      train_cfg.keep_last),
        load=lambda d: load_checkpoint(runner, d, launch), loss_ranks=launch.dp_size)


SPEC = register(LayoutSpec(
    name="pipeline", build=build, check_config=check_pipeline_config, check_resume=check_resume,
    pipeline_stages=2, groups=True, auto=True,
    describe="the encoder stack on one rank, the decoder stack on the next"))
