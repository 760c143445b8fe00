"""The trainer: one loop for every layout.

A layout (one DeepSpeed engine per rank, or a 2-stage pipeline) is a `Backend`: what one step's
forward and backward, the optimizer step, the LR, evaluation, saving and loading mean for it
(rcn_dist/backends.py builds both). Everything else lives here, once: the run's set-up
(`setup_run`: threads, loggers, stop flag, process group, run directory, the checkpoint to resume),
`run_loop` (agreement on the losses, logging, eval and checkpoint cadence, stop signals),
`evaluate` (the test metrics, also `rcn eval`'s) and the exit codes.

Exit codes: 0 finished; 3 stopped on a signal after a checkpoint (resumable: run again on the
same RUN_DIR); 2 bad input or configuration; 4 the loss became NaN/inf.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcn_dist import console
from rcn_dist.config import Config
from rcn_dist.errors import RcnError
from rcn_dist.files import atomic_write
from rcn_dist.model import bits_per_dim, noise_for

EXIT_STOPPED = 3
EXIT_DIVERGED = 4
EVAL_NOISE_SEED = 2**31 - 1  # offset of the eval noise stream from the training one
TERMS = ("loss", "margin", "recon", "kl", "elbo")
"""The per-step loss parts every backend returns, in this order."""


class Diverged(RcnError):
    exit_code = EXIT_DIVERGED


class LossModule(nn.Module):
    """The RCN and its per-sample loss terms in one forward: what the DeepSpeed engine wraps and
    what `evaluate` calls.

    Inputs are cast to the parameters' dtype (bf16 under DeepSpeed bf16); the terms come back
    in fp32 so that sums over a test set stay exact enough to compare across layouts.
    """

    def __init__(self, rcn: nn.Module):
        super().__init__()
        self.rcn = rcn

    def forward(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                x_caps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        dtype = next(self.rcn.parameters()).dtype
        y = y.to(dtype) if y.is_floating_point() else y
        x_caps = None if x_caps is None else x_caps.to(dtype)
        terms = self.rcn.loss_terms(x.to(dtype), y, eps=eps.to(dtype), x_caps=x_caps)
        return {k: v.float() if v.is_floating_point() else v for k, v in terms.items()}


def caps_input(batch: dict[str, torch.Tensor], cfg: Config, device: str | torch.device,
               keep: torch.Tensor | None = None) -> torch.Tensor | None:
    """What the encoder capsules see for this batch (data.caps_input): the grey image (only the
    rows `keep` selects, where given), or None (the binarised image itself)."""
    if cfg.data.caps_input != "grey" or "grey" not in batch:
        return None
    grey = batch["grey"] if keep is None else batch["grey"][keep.cpu()]
    return grey.to(device)


@torch.no_grad()
def evaluate(engine_or_module, stream, cfg: Config, device: str, max_batches: int = 0,
             progress: bool = False) -> dict[str, float]:
    """Metrics of the stream's split ("test_*", or "val_*" on the validation split) summed over
    the valid (unpadded) samples of every rank.

    The same noise (seeded by train.seed and the sample index) is used for every evaluation of a
    checkpoint, so the loop's test ELBO and `rcn eval`'s are the same number. Where the whole
    model is on this rank, the capsule statistics of the first batch ride along ("caps_*":
    spread across images and lengths, rcn_dist/model/usage.py), so that capsules that stop
    carrying the image show while the run trains.
    """
    import torch.distributed as dist

    from rcn_dist.model.usage import capsule_stats

    module = getattr(engine_or_module, "module", engine_or_module)
    was_training = module.training
    module.eval()
    keys = ("correct", "elbo", "recon", "kl", "margin")
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
    n_batches = 0
    caps: dict[str, float] = {}
    for batch in console.track(stream, "eval", enabled=progress):
        x, y = batch["image"].to(device), batch["label"].to(device)
        eps = noise_for(batch, cfg.train.seed + EVAL_NOISE_SEED, cfg).to(device)
        x_caps = caps_input(batch, cfg, device)
        terms = engine_or_module(x, y, eps, x_caps=x_caps)
        rcn = getattr(module, "rcn", None)
        if not caps and rcn is not None and int(batch["mask"].sum()) > 1:
            keep, dtype = batch["mask"].to(device), next(rcn.parameters()).dtype
            xc = None if x_caps is None else x_caps[keep].to(dtype)
            caps = {f"caps_{k}": v for k, v in capsule_stats(rcn, x[keep].to(dtype), eps[keep].to(dtype), xc).items()}
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
    split = "val" if getattr(stream, "split", "test") == "val" else "test"
    out = {f"{split}_{k}": sums[i].item() / n for i, k in enumerate(keys) if k != "correct"}
    # No classifier (model.enc_capsules=False): the error is undefined, not 90%.
    out[f"{split}_error"] = 1.0 - sums[0].item() / n if cfg.model.enc_capsules else float("nan")
    out[f"{split}_n"] = int(sums[-1].item())
    if cfg.model.likelihood == "logistic":
        m = cfg.model
        out[f"{split}_bits_per_dim"] = bits_per_dim(out[f"{split}_elbo"], m.in_channels * m.height * m.width)
    return out | caps


def position_from_samples(stream, samples: int, dp_size: int) -> dict[str, int]:
    """A loader position for this layout after `samples` images were seen by the whole job.

    Used after a world-size change, when the saved per-rank positions no longer apply: the
    epoch and the fraction of it are carried over, the exact sample order is not.
    """
    per_batch = stream.batch_size * dp_size
    per_epoch = stream.batches_per_epoch * per_batch
    return stream.state_dict() | {"epoch": samples // per_epoch, "batch": (samples % per_epoch) // per_batch}


def train_stream(cfg: Config, dp_rank: int, dp_size: int):
    """The training split of data-parallel rank `dp_rank`, micro-batches of train.micro_batch."""
    from rcn_dist.data.loader import TrainStream

    t = cfg.train
    return TrainStream(cfg.data.dir, t.micro_batch, dp_rank, dp_size, t.seed,
                       num_workers=cfg.data.num_workers, binarize=cfg.data.binarize,
                       shuffle=cfg.data.shuffle, cache_dir=cfg.data.cache_dir or None)


def test_stream(cfg: Config, data_dir: str, batch_size: int, dp_rank: int, dp_size: int, split: str = "test"):
    """The test split (or `split`), each image once across ranks, binarised as the training data
    is, but with one fixed draw: with data.binarize=dynamic every test image gets the same
    Bernoulli sample at every evaluation (seeded by its index alone), the usual "fixed
    binarisation" of a test set. A 0.5 threshold instead would show the model silhouettes it
    never saw in training."""
    from rcn_dist.data.loader import EvalStream

    return EvalStream(data_dir, batch_size, dp_rank, dp_size, split=split, binarize=cfg.data.binarize, seed=0,
                      cache_dir=cfg.data.cache_dir or None)


def periodic_stream(cfg: Config, batch_size: int, dp_rank: int, dp_size: int):
    """What the training loop evaluates on: the validation split where `rcn prepare` made one
    (hyper-parameters are chosen on it), else the test split."""
    from rcn_dist.data.loader import Manifest

    split = "val" if "val" in Manifest.load(cfg.data.dir, cfg.data.cache_dir or None).splits() else "test"
    return test_stream(cfg, cfg.data.dir, batch_size, dp_rank, dp_size, split=split)


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
class Backend:
    """What differs between layouts (one DeepSpeed engine per rank, or one pipeline stack per
    rank); run_loop() does the rest: agreement, logging, eval and checkpoint cadence, stops."""

    forward_backward: Callable[[Iterator[dict[str, torch.Tensor]], int], torch.Tensor]
    """(batches, step) -> (5,) float64: run train.grad_accum micro-steps (forward and backward)
    on batches from the iterator, leave the gradients ready for the update, return the summed
    TERMS batch means (zeros on ranks that hold no loss)."""
    update: Callable[[], Any]
    """The optimizer step, after every rank agreed the losses are finite."""
    lr: Callable[[], float]
    """The learning rate after the update."""
    evaluate: Callable[[bool], dict[str, Any]]
    """(at_end) -> test metrics (collective)."""
    save: Callable[[int, dict[str, Any]], Path]
    """(step, loop_state) -> the checkpoint directory written (collective)."""
    load: Callable[[Path], dict[str, Any]]
    """(checkpoint dir) -> the loop state saved with it, weights, optimizer and RNG restored;
    its "loader" is None when the saved data positions do not apply to this layout."""
    loss_ranks: int
    """How many ranks' loss parts the all-reduce adds up."""


@dataclass
class Run:
    """A started run: what setup_run() gives every backend and run_loop()."""

    cfg: Config
    le: Any
    """The rank's LaunchEnv (rcn_dist.parallel.env)."""
    run_dir: Path
    out: console.Console
    logger: Any
    stop: StopFlag
    latest: Path | None
    """The newest complete checkpoint in run_dir, to resume from."""


def setup_run(cfg: Config, le, run_dir: Path, deepspeed: bool) -> Run:
    """What every layout does before building its model: CPU threads, loggers, the stop flag, the
    process group (through DeepSpeed for the engine backend), config.json, the checkpoint to resume."""
    from rcn_dist.loggers import make_loggers
    from rcn_dist.parallel import checkpoint as ckpt
    from rcn_dist.parallel.env import init_process_group

    if le.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Several ranks on one machine (data-parallel or pipeline) must not each spin up a thread
        # per core: oversubscribed OpenMP threads spin while their partners wait, and a step gets
        # many times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // le.local_world_size))
    logger = make_loggers(cfg, run_dir, le.rank)  # before the process group: a missing package stops all ranks
    stop = StopFlag().install()
    init_process_group(le, deepspeed=deepspeed)
    out = console.Console(le.rank == 0)
    if le.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.json", cfg.to_json())
    latest, notes = ckpt.find_latest(run_dir)
    for n in notes:
        out.info(n)
    return Run(cfg, le, run_dir, out, logger, stop, latest)


def run_loop(run: Run, backend: Backend) -> int:
    """Resume from run.latest if there is one, train to cfg.train.steps, then tear the process
    group down. Returns the exit code: 0, or EXIT_STOPPED after a stop signal (and a
    checkpoint). Raises Diverged, before the update, when any rank's loss is not finite."""
    cfg, le, out = run.cfg, run.le, run.out
    stream = train_stream(cfg, le.dp_rank, le.dp_size)
    step, samples = 0, 0
    if run.latest is not None:
        state = backend.load(run.latest)
        step, samples = state["step"], state["samples"]
        loader = state["loader"]
        stream.load_state_dict(loader if loader is not None else position_from_samples(stream, samples, le.dp_size))
        out.info(f"resumed from {run.latest} (step {step})")
    progress = out.progress(total=cfg.train.steps, start=step, label=f"train {cfg.name}")
    try:
        stopped = _steps(run, backend, stream, step, samples, progress)
    finally:
        progress.close()
        run.logger.close()
        run.stop.restore()
    return _end_run(stopped, cfg.train.steps, out, run.run_dir, run.stop)


def _steps(run: Run, backend: Backend, stream, step: int, samples: int, progress) -> bool:
    # The loop of run_loop(); True when a stop signal ended it early.
    import torch.distributed as dist

    from rcn_dist.parallel import checkpoint as ckpt

    t, rank, stop, logger = run.cfg.train, run.le.rank, run.stop, run.logger
    last_good = str(run.latest) if run.latest else "none"
    batches = iter(stream)
    while step < t.steps:
        ckpt.fault_point("step", step, rank)
        tic = time.perf_counter()
        parts = backend.forward_backward(batches, step)
        # One collective per step: the loss parts, any rank's stop signal, any non-finite loss,
        # agreed before the update so that a NaN never reaches the weights.
        flag = torch.cat([parts / t.grad_accum, torch.tensor(
            [float(stop.signum != 0), float(not torch.isfinite(parts).all())], dtype=torch.float64)])
        dist.all_reduce(flag)
        if flag[6] > 0:
            raise Diverged(f"loss is not finite at step {step + 1}; last good checkpoint: {last_good}")
        backend.update()
        parts = flag[:5] / backend.loss_ranks
        step += 1
        samples += t.batch_size
        dt = time.perf_counter() - tic
        row = {"step": step} | {k: parts[i].item() for i, k in enumerate(TERMS)} | {
            "lr": backend.lr(), "img_per_s": t.batch_size / dt, "samples": samples}
        if rank == 0 and (step % t.log_every == 0 or step == t.steps):
            logger.log(row)
        progress.update(step, row)

        at_end = step == t.steps
        if (t.eval_every and step % t.eval_every == 0) or at_end:
            ev = backend.evaluate(at_end) | {"step": step, "kind": "eval", "full": at_end or not t.eval_batches}
            if rank == 0:
                logger.log(ev)
            progress.eval(ev)
        stopping = flag[5] > 0
        if (t.ckpt_every and step % t.ckpt_every == 0) or at_end or stopping:
            loop_state = {"step": step, "samples": samples, "loader": stream.state_dict()}
            last_good = str(backend.save(step, loop_state))
        if stopping and not at_end:
            run.out.info(f"stop signal: checkpointed at step {step} in {last_good}; "
                         f"exit {EXIT_STOPPED} (run again on {run.run_dir} to resume)")
            return True
    return False


def _end_run(stopped: bool, steps: int, out, run_dir: Path, stop: StopFlag) -> int:
    """After the loop, on every rank: the last line, the process group's teardown and, under
    submitit after a stop, the requeue. Returns the exit code."""
    import torch.distributed as dist

    if not stopped:
        out.info(f"done: {steps} steps; run directory {run_dir}")
    # Without this barrier, 2 of 6 gloo runs ended with SIGABRT ("terminate called without an
    # active exception") at teardown; with it, 0 of 30.
    dist.barrier()
    dist.destroy_process_group()
    if stopped:
        stop.hand_over()  # under submitit: task 0 requeues the job and exits here
    return EXIT_STOPPED if stopped else 0
