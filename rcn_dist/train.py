"""The training loop: `rcn train` and launch/train.py.

Launched by the `deepspeed` launcher, torchrun, srun, mpirun or as one plain process, it does
the same run: the DeepSpeed engine (ZeRO and precision from the config + JSON), WebDataset
shards split by data-parallel rank, evaluation every N steps, metrics.jsonl, checkpoints that
resume exactly, and a cooperative stop on SIGTERM/SIGUSR1/SIGUSR2.

Exit codes: 0 finished; 3 stopped on a signal after a checkpoint (resumable: run again on the
same RUN_DIR); 2 bad input or configuration; 4 the loss became NaN/inf.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcn_dist import console
from rcn_dist.config import Config, ConfigError, resolve
from rcn_dist.errors import CheckpointError, RcnError

EXIT_STOPPED = 3
EXIT_DIVERGED = 4
EVAL_NOISE_SEED = 2**31 - 1  # offset of the eval noise stream from the training one


class Diverged(RcnError):
    exit_code = EXIT_DIVERGED


def build_parser(prog: str = "rcn train") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Train the Recurrent Capsule Network.")
    ap.add_argument("--preset", help="named preset: tiny, small, mnist, cifar10, multimnist")
    ap.add_argument("--config", help="config file (.json or .toml), laid over the preset")
    ap.add_argument("--data", help="prepared shard directory (overrides data.dir)")
    ap.add_argument("--out", default="runs/default", help="run directory (resumes if it holds a checkpoint)")
    ap.add_argument("--steps", type=int, help="train until this optimizer step (overrides train.steps)")
    ap.add_argument("--seed", type=int, help="overrides train.seed")
    ap.add_argument("--deepspeed", metavar="PATH", help="DeepSpeed JSON (engine settings: ZeRO stage, ...)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.lr=3e-3")
    return ap


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.dir={args.data}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if not args.preset and not args.config:
        raise ConfigError("give --preset NAME or --config FILE")
    return resolve(args.preset, args.config, overrides)


class LossModule(nn.Module):
    """What the engine wraps: the RCN and its per-sample loss terms in one forward.

    Inputs are cast to the parameters' dtype (bf16 under DeepSpeed bf16); the terms come back
    in fp32 so that sums over a test set stay exact enough to compare across layouts.
    """

    def __init__(self, rcn: nn.Module):
        super().__init__()
        self.rcn = rcn

    def forward(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = next(self.rcn.parameters()).dtype
        y = y.to(dtype) if y.is_floating_point() else y
        terms = self.rcn.loss_terms(x.to(dtype), y, eps=eps.to(dtype))
        return {k: v.float() if v.is_floating_point() else v for k, v in terms.items()}


def noise_for(batch: dict[str, torch.Tensor], seed: int, cfg: Config) -> torch.Tensor:
    """Latent noise eps (B, T, z) from (seed, sample index): the same whatever the layout."""
    from rcn_dist.model import sample_noise

    return sample_noise(batch["index"], seed, cfg.model.T, cfg.model.z_dim)


def step_noise_seed(seed: int, step: int) -> int:
    # A fresh noise stream per optimizer step; the sample index picks the draw inside it.
    return (seed * 1_000_003 + step) % (2**62)


@torch.no_grad()
def evaluate(engine_or_module, stream, cfg: Config, device: str, max_batches: int = 0,
             progress: bool = False) -> dict[str, float]:
    """Test metrics summed over the valid (unpadded) samples of every rank.

    The same noise (seeded by train.seed and the sample index) is used for every evaluation of a
    checkpoint, so the loop's test ELBO and `rcn eval`'s are the same number.
    """
    import torch.distributed as dist

    module = getattr(engine_or_module, "module", engine_or_module)
    was_training = module.training
    module.eval()
    keys = ("correct", "elbo", "recon", "kl", "margin")
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
    n_batches = 0
    for batch in console.track(stream, "eval", enabled=progress):
        x, y = batch["image"].to(device), batch["label"].to(device)
        eps = noise_for(batch, cfg.train.seed + EVAL_NOISE_SEED, cfg).to(device)
        terms = engine_or_module(x, y, eps)
        mask = batch["mask"].to(device).double()
        for i, k in enumerate(keys):
            sums[i] += (terms[k].double() * mask).sum().cpu()
        sums[-1] += mask.sum().cpu()
        n_batches += 1
        if max_batches and n_batches >= max_batches:
            break
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    module.train(was_training)
    n = max(sums[-1].item(), 1.0)
    out = {f"test_{k}": sums[i].item() / n for i, k in enumerate(keys) if k != "correct"}
    out["test_error"] = 1.0 - sums[0].item() / n
    out["test_n"] = int(sums[-1].item())
    if cfg.model.likelihood == "logistic":
        c, h, w = cfg.model.in_channels, cfg.model.height, cfg.model.width
        out["test_bits_per_dim"] = out["test_elbo"] / (c * h * w * 0.6931471805599453)
    return out


def _verify_loaded_weights(engine, ckpt_dir: Path, rank0: bool, out) -> None:
    """After a layout change, check the loaded model against the checkpoint's consolidated
    weights (model.safetensors): the conversion must carry the model state over exactly."""
    from rcn_dist.parallel import checkpoint as ckpt

    loaded = ckpt.consolidated_state_dict(engine)  # collective under ZeRO-3
    if not rank0:
        return
    saved = ckpt.read_safetensors(ckpt_dir / "model.safetensors")
    bad = [k for k, v in saved.items() if k not in loaded or not torch.equal(loaded[k].float().cpu(), v)]
    if bad or len(loaded) != len(saved):
        raise CheckpointError(f"{ckpt_dir}: weights after the layout change differ from model.safetensors "
                              f"({', '.join(bad[:3]) or 'parameter sets differ'})")
    out.info(f"model state identical to {ckpt_dir / 'model.safetensors'} after the layout change")


def position_from_samples(stream, samples: int, dp_size: int) -> dict[str, int]:
    """A loader position for this layout after `samples` images were seen by the whole job.

    Used after a world-size change, when the saved per-rank positions no longer apply: the
    epoch and the fraction of it are carried over, the exact sample order is not.
    """
    per_batch = stream.batch_size * dp_size
    per_epoch = stream.batches_per_epoch * per_batch
    return stream.state_dict() | {"epoch": samples // per_epoch, "batch": (samples % per_epoch) // per_batch}


def test_stream(cfg: Config, data_dir: str, batch_size: int, dp_rank: int, dp_size: int):
    """The test split, each image once across ranks, binarised as the training data is, but
    with one fixed draw: with data.binarize=dynamic every test image gets the same Bernoulli
    sample at every evaluation (seeded by its index alone), the usual "fixed binarisation" of a
    test set. A 0.5 threshold instead would show the model silhouettes it never saw in training."""
    from rcn_dist.data.loader import EvalStream

    return EvalStream(data_dir, batch_size, dp_rank, dp_size, binarize=cfg.data.binarize, seed=0,
                      cache_dir=cfg.data.cache_dir or None)


class StopFlag:
    """SIGTERM / SIGUSR1 / SIGUSR2 set a flag; the loop acts on it at the next step boundary.

    Under submitit, its own SIGUSR2 handler (installed before ours) would requeue at once from
    task 0 alone. We hold it back: every rank first checkpoints at the step boundary, then
    `hand_over()` calls it, and it requeues the job (task 0) or returns (the other tasks).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum = 0
        self.received: set[int] = set()
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.received.add(signum)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    def hand_over(self) -> None:
        """After the checkpoint: pass the signal on to submitit's handler, if it installed one.

        SIGUSR2 wins over SIGTERM: submitit's preemption sends both (in either order), and only its
        SIGUSR2 handler requeues (its SIGTERM handler just logs).
        """
        signum = signal.SIGUSR2 if signal.SIGUSR2 in self.received else self.signum
        prev = self._previous.get(signum)
        if callable(prev) and getattr(prev, "__module__", "").startswith("submitit"):
            prev(signum, None)


@dataclass
class StepHooks:
    """What differs between the plain loop (one DeepSpeed engine) and the pipeline loop (one stack
    per rank); run_loop() does the rest: agreement, logging, eval and checkpoint cadence, stops."""

    grads: Callable[[Iterator[dict[str, torch.Tensor]], int], torch.Tensor]
    """(batches, step) -> (5,) float64: run train.grad_accum micro-steps on batches from the
    iterator, leave the gradients ready for the update, return the summed (loss, margin, recon,
    kl, elbo) batch means (zeros on ranks that hold no loss)."""
    update: Callable[[], Any]
    """The optimizer step, after every rank agreed the losses are finite."""
    lr: Callable[[], float]
    """The learning rate after the update."""
    evaluate: Callable[[bool], dict[str, Any]]
    """(at_end) -> test metrics (collective)."""
    save: Callable[[int, dict[str, Any]], Path]
    """(step, loop_state) -> the checkpoint directory written (collective)."""
    loss_ranks: int
    """How many ranks' loss parts the all-reduce adds up."""


def run_loop(cfg: Config, hooks: StepHooks, stream, step: int, samples: int, latest: Path | None, stop: StopFlag,
             logger, out, run_dir: Path, rank: int) -> int:
    """Train from `step` (and `latest`, the checkpoint it came from) to cfg.train.steps, then tear
    the process group down. Returns the exit code: 0, or EXIT_STOPPED after a stop signal (and a
    checkpoint). Raises Diverged, before the update, when any rank's loss is not finite."""
    progress = out.progress(total=cfg.train.steps, start=step, label=f"train {cfg.name}")
    try:
        stopped = _steps(cfg, hooks, stream, step, samples, str(latest) if latest else "none", stop, logger,
                         progress, out, run_dir, rank)
    finally:
        progress.close()
        logger.close()
        stop.restore()
    return _end_run(stopped, cfg.train.steps, out, run_dir, stop)


def _steps(cfg: Config, hooks: StepHooks, stream, step: int, samples: int, last_good: str, stop: StopFlag,
           logger, progress, out, run_dir: Path, rank: int) -> bool:
    # The loop of run_loop(); True when a stop signal ended it early.
    import torch.distributed as dist

    from rcn_dist.parallel import checkpoint as ckpt

    t = cfg.train
    batches = iter(stream)
    while step < t.steps:
        ckpt.fault_point("step", step, rank)
        tic = time.perf_counter()
        parts = hooks.grads(batches, step)
        # One collective per step: the loss parts, any rank's stop signal, any non-finite loss,
        # agreed before the update so that a NaN never reaches the weights.
        flag = torch.cat([parts / t.grad_accum, torch.tensor(
            [float(stop.signum != 0), float(not torch.isfinite(parts).all())], dtype=torch.float64)])
        dist.all_reduce(flag)
        if flag[6] > 0:
            raise Diverged(f"loss is not finite at step {step + 1}; last good checkpoint: {last_good}")
        hooks.update()
        parts = flag[:5] / hooks.loss_ranks
        step += 1
        samples += t.batch_size
        dt = time.perf_counter() - tic
        row = {"step": step, "loss": parts[0].item(), "margin": parts[1].item(),
               "recon": parts[2].item(), "kl": parts[3].item(), "elbo": parts[4].item(),
               "lr": hooks.lr(), "img_per_s": t.batch_size / dt, "samples": samples}
        if rank == 0 and (step % t.log_every == 0 or step == t.steps):
            logger.log(row)
        progress.update(step, row)

        at_end = step == t.steps
        if (t.eval_every and step % t.eval_every == 0) or at_end:
            ev = hooks.evaluate(at_end) | {"step": step, "kind": "eval", "full": at_end or not t.eval_batches}
            if rank == 0:
                logger.log(ev)
            progress.eval(ev)
        stopping = flag[5] > 0
        if (t.ckpt_every and step % t.ckpt_every == 0) or at_end or stopping:
            loop_state = {"step": step, "samples": samples, "loader": stream.state_dict()}
            last_good = str(hooks.save(step, loop_state))
        if stopping and not at_end:
            out.info(f"stop signal: checkpointed at step {step} in {last_good}; "
                     f"exit {EXIT_STOPPED} (run again on {run_dir} to resume)")
            return True
    return False


def _end_run(stopped: bool, steps: int, out, run_dir: Path, stop: StopFlag) -> int:
    """After the loop, on every rank: the last line, the process group's teardown and, under
    submitit after a stop, the requeue. Returns the exit code."""
    import torch.distributed as dist

    if not stopped:
        out.info(f"done: {steps} steps; run directory {run_dir}")
    dist.barrier()  # without it, gloo teardown aborted ~1 run in 3 (stack-facts.md)
    dist.destroy_process_group()
    if stopped:
        stop.hand_over()  # under submitit: task 0 requeues the job and exits here
    return EXIT_STOPPED if stopped else 0


def _check_run_dir(run_dir: Path, cfg: Config) -> None:
    """A run dir that holds another model's checkpoints is refused, not overwritten."""
    saved = run_dir / "config.json"
    if saved.is_file():
        old = json.loads(saved.read_text()).get("model", {})
        new = json.loads(cfg.to_json())["model"]
        diff = sorted(k for k in new if old.get(k) != new[k])
        if diff:
            raise CheckpointError(f"{run_dir} holds a run with a different model config "
                                  f"(model.{', model.'.join(diff[:4])} differ): use another --out")


def _check_resume_layout(run_dir: Path, cfg: Config, le) -> None:
    """A checkpoint from another world size or ZeRO stage is converted to DeepSpeed's universal
    format on resume; DeepSpeed loads that only into a ZeRO (1-3) optimizer."""
    from rcn_dist.parallel import checkpoint as ckpt

    latest, _ = ckpt.find_latest(run_dir)
    if latest is None:
        return
    saved = ckpt.saved_layout(latest)
    if saved.get("pipeline_stages", 1) != 1:
        raise ConfigError(f"{latest} is a pipeline checkpoint ({saved['pipeline_stages']} stages): resume it with "
                          f"parallel.pipeline_stages={saved['pipeline_stages']}, or evaluate it with `rcn eval`")
    if (saved["world_size"], saved["zero_stage"]) != (le.world_size, cfg.parallel.zero_stage) \
            and cfg.parallel.zero_stage == 0:
        raise ConfigError(f"{latest} was saved by {saved['world_size']} rank(s) with ZeRO {saved['zero_stage']}; "
                          f"resuming it on {le.world_size} rank(s) needs ZeRO stage 1, 2 or 3 "
                          f"(e.g. --deepspeed configs/ds_fp32.json), not 0")


def prepare_run(args: argparse.Namespace):
    """Everything that can be checked before a process group starts."""
    from rcn_dist.data.loader import Manifest
    from rcn_dist.memory import check_fits
    from rcn_dist.parallel.engine import load_ds_json, resolve_engine_settings
    from rcn_dist.parallel.env import detect

    cfg = config_from_args(args)
    ds = load_ds_json(args.deepspeed)
    le = detect(pipeline_stages=cfg.parallel.pipeline_stages)
    if le.world_size % cfg.parallel.pipeline_stages:
        raise ConfigError(f"world size {le.world_size} is not divisible by parallel.pipeline_stages="
                          f"{cfg.parallel.pipeline_stages}")
    resolve_engine_settings(cfg, ds, le.dp_size, le.device)
    check_fits(cfg, le)  # refuse now what would run out of memory at step 1
    manifest = Manifest.load(cfg.data.dir, cache_dir=cfg.data.cache_dir or None)
    shape = tuple(manifest.image_shape)
    want = (cfg.model.in_channels, cfg.model.height, cfg.model.width)
    if shape != want:
        raise ConfigError(f"data {cfg.data.dir} holds {shape[0]}x{shape[1]}x{shape[2]} images, the model "
                          f"expects model.in_channels/height/width = {want[0]}x{want[1]}x{want[2]}")
    run_dir = Path(args.out)
    _check_run_dir(run_dir, cfg)
    if cfg.parallel.pipeline_stages > 1:
        from rcn_dist.parallel.pipeline import check_pipeline_config

        check_pipeline_config(cfg, le, run_dir)  # also checks the layout of a checkpoint to resume
    else:
        _check_resume_layout(run_dir, cfg, le)
    return cfg, ds, le, manifest, run_dir


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from rcn_dist.data.loader import TrainStream
    from rcn_dist.loggers import make_loggers
    from rcn_dist.model import RCN
    from rcn_dist.parallel import checkpoint as ckpt
    from rcn_dist.parallel.engine import init_distributed, initialize
    from rcn_dist.parallel.env import finish_rendezvous
    from rcn_dist.parallel.safety import check_checkpoint_dir

    cfg, ds, le, manifest, run_dir = prepare_run(args)
    if le.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Several ranks on one machine (data-parallel or pipeline) must not each spin up a thread
        # per core: oversubscribed OpenMP threads spin while their partners wait, and a step gets
        # many times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // le.local_world_size))
    if cfg.parallel.pipeline_stages > 1:
        from rcn_dist.parallel.pipeline import run_pipeline

        return run_pipeline(cfg, ds, le, run_dir)

    logger = make_loggers(cfg, run_dir, le.rank)  # before the process group: a missing package stops all ranks
    stop = StopFlag().install()
    finish_rendezvous(le)
    if le.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(le.device))
    init_distributed(le.backend)
    rank0 = le.rank == 0
    out = console.Console(rank0)
    t = cfg.train
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_dir / "config.json", cfg.to_json())
    out.info(f"{le.launcher}: {le.world_size} rank(s), {le.backend} on {le.device}; "
             f"{cfg.name} preset, ZeRO {cfg.parallel.zero_stage}, {t.precision}, "
             f"global batch {t.batch_size} = {t.micro_batch} x {t.grad_accum} x {le.dp_size}")

    latest, notes = ckpt.find_latest(run_dir)
    universal = False
    if latest is not None:
        saved = ckpt.saved_layout(latest)
        universal = (saved["world_size"], saved["zero_stage"]) != (le.world_size, cfg.parallel.zero_stage)
        if universal:
            out.info(f"{latest} was saved by {saved['world_size']} rank(s) with ZeRO {saved['zero_stage']}; "
                     f"converting it to DeepSpeed's universal format for {le.world_size} with ZeRO "
                     f"{cfg.parallel.zero_stage}")
            check_checkpoint_dir(latest)  # every rank: a bad file is refused on all, none waits
            if rank0:
                ckpt.to_universal(latest)
            dist.barrier()
            ds = ds | {"checkpoint": {"load_universal": True}}

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = RCN(cfg.model)
    engine, _, scheduler = initialize(LossModule(model), cfg, ds)
    device = le.device
    stream = TrainStream(cfg.data.dir, t.micro_batch, le.dp_rank, le.dp_size, t.seed,
                         num_workers=cfg.data.num_workers, binarize=cfg.data.binarize,
                         shuffle=cfg.data.shuffle, cache_dir=cfg.data.cache_dir or None)
    step, samples = 0, 0
    for n in notes:
        out.info(n)
    if latest is not None:
        state = ckpt.load(engine, latest, le.rank, universal=universal)
        step, samples = state["step"], state["samples"]
        if universal:
            stream.load_state_dict(position_from_samples(stream, samples, le.dp_size))
        else:
            stream.load_state_dict(state["loader"])
        if universal:
            _verify_loaded_weights(engine, latest, rank0, out)
        out.info(f"resumed from {latest} (step {step})")

    def grads(batches, step: int) -> torch.Tensor:
        parts = torch.zeros(5, dtype=torch.float64)  # loss, margin, recon, kl, elbo
        for micro in range(t.grad_accum):
            batch = next(batches)
            x, y = batch["image"].to(device), batch["label"].to(device)
            eps = noise_for(batch, step_noise_seed(t.seed, step), cfg).to(device)
            terms = engine(x, y, eps)
            engine.backward(terms["loss"].mean())
            parts += torch.stack([terms[k].detach().mean().double().cpu()
                                  for k in ("loss", "margin", "recon", "kl", "elbo")])
            if micro < t.grad_accum - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        return parts

    hooks = StepHooks(
        grads=grads, update=engine.step, lr=lambda: scheduler.get_last_lr()[0],
        evaluate=lambda at_end: evaluate(engine, test_stream(cfg, cfg.data.dir, t.micro_batch, le.dp_rank, le.dp_size),
                                         cfg, device, max_batches=0 if at_end else t.eval_batches),
        save=lambda step, loop_state: ckpt.save(engine, run_dir, step, loop_state, cfg, le.rank, le.world_size,
                                                t.keep_last),
        loss_ranks=le.world_size)
    return run_loop(cfg, hooks, stream, step, samples, latest, stop, logger, out, run_dir, le.rank)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return run(args)


if __name__ == "__main__":
    from rcn_dist.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
