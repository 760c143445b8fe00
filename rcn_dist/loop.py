"""The trainer: one loop for every layout.

A layout (one DeepSpeed engine per rank, or a 2-stage pipeline) is a `Backend`: what one step's
forward and backward, the optimizer step, the LR, evaluation, saving and loading mean for it
(rcn_dist/backends.py builds both). Everything else lives here, once: the run's set-up
(`setup_run`: threads, loggers, stop flag, process group, run directory, the checkpoint to resume),
`run_loop` (agreement on the losses, logging, eval and checkpoint cadence, stop signals),
`evaluate` (the test metrics, also `rcn eval`'s) and the exit codes.

Exit codes: 0 finished; 3 stopped on a signal (resumable: run again on the same RUN_DIR), after a
checkpoint at the step boundary, or before the first step with nothing to save; 2 bad input or
configuration; 4 the loss became NaN/inf.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcn_dist import console, signals, speed, testhooks
from rcn_dist.config import Config
from rcn_dist.errors import RcnError
from rcn_dist.files import atomic_write
from rcn_dist.model import bits_per_dim, noise_for, step_noise_seed
from rcn_dist.model.precision import at_least_fp32
from rcn_dist.parallel import collectives

EXIT_STOPPED = signals.EXIT_STOPPED
EXIT_DIVERGED = 4
EVAL_NOISE_SEED = 2**31 - 1  # offset of the eval noise stream from the training one
TERMS = ("loss", "margin", "recon", "kl", "elbo")
"""The per-step loss parts every backend returns, in this order."""


class Diverged(RcnError):
    exit_code = EXIT_DIVERGED


class LossModule(nn.Module):
    """The RCN and its per-sample loss terms in one forward: what the DeepSpeed engine wraps and
    what `evaluate` calls.

    Inputs pass as they come (fp32), whatever dtype DeepSpeed's bf16/fp16 engine cast the weights
    to: the model casts each layer's input to that layer's weights and keeps the canvas, the
    likelihoods, the KL and the latent noise eps in fp32 (docs/training.md, "Precision"). Rounding
    eps or x to bf16 here would change the sample and the likelihood, not just the arithmetic.
    The terms come back in fp32 at least, so that sums over a test set stay exact enough to
    compare across layouts.
    """

    def __init__(self, rcn: nn.Module):
        super().__init__()
        self.rcn = rcn

    def forward(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                x_caps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        terms = self.rcn.loss_terms(x, y, eps=eps, x_caps=x_caps)
        return {k: at_least_fp32(v) if v.is_floating_point() else v for k, v in terms.items()}


def caps_input(batch: dict[str, torch.Tensor], cfg: Config, device: str | torch.device,
               keep: torch.Tensor | None = None) -> torch.Tensor | None:
    """What the encoder capsules see for this batch (data.caps_input): the grey image (only the
    rows `keep` selects, where given), or None (the binarised image itself)."""
    if cfg.data.caps_input != "grey" or "grey" not in batch:
        return None
    grey = batch["grey"] if keep is None else batch["grey"][keep.cpu()]
    return to_device(grey, device)


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A loader tensor on the rank's device. On a GPU the copy does not block the host: the
    training loader pins its batches (TrainStream pin_memory), so the copy overlaps the step;
    an unpinned tensor is copied synchronously as before."""
    return t.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(engine_or_module, stream, cfg: Config, device: str, max_batches: int = 0,
             progress: bool = False) -> dict[str, float]:
    """Metrics of the stream's split ("test_*", or "val_*" on the validation split) summed over
    the valid (unpadded) samples of every rank.

    The same noise (seeded by train.seed and the sample index) is used for every evaluation of a
    checkpoint, so the loop's test ELBO and `rcn eval`'s are the same number. Where the whole
    model is on this rank, the capsule statistics of the first batch ride along ("caps_*":
    spread across images and lengths, rcn_dist/model/usage.py), so that capsules that stop
    carrying the image show while the run trains, and so do the first batch's active units and
    write-window area ("info_*", rcn_dist.information.batch_information: two more forward passes
    of that batch).
    """
    from rcn_dist.information import batch_information
    from rcn_dist.model.usage import capsule_stats

    module = getattr(engine_or_module, "module", engine_or_module)
    was_training = module.training
    module.eval()
    keys = ("correct", "elbo", "recon", "kl", "margin")
    # The sums stay on the device until the one all-reduce at the end: no host sync per batch.
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=device)
    caps: dict[str, float] = {}
    for n_batches, batch in enumerate(console.track(stream, "eval", enabled=progress), 1):
        x, y = to_device(batch["image"], device), to_device(batch["label"], device)
        eps = noise_for(batch, cfg.train.seed + EVAL_NOISE_SEED, cfg, device=device)
        x_caps = caps_input(batch, cfg, device)
        terms = engine_or_module(x, y, eps, x_caps=x_caps)
        rcn = getattr(module, "rcn", None)
        if not caps and rcn is not None and int(batch["mask"].sum()) > 1:
            keep = batch["mask"].to(device)
            xc = None if x_caps is None else x_caps[keep]
            caps = {f"caps_{k}": v for k, v in capsule_stats(rcn, x[keep], eps[keep], xc).items()}
            # A second posterior path per image (IW sample 1's noise) for the active units.
            eps2 = noise_for(batch, step_noise_seed(cfg.train.seed + EVAL_NOISE_SEED, 1), cfg, device=device)
            caps |= batch_information(rcn, x[keep], (eps[keep], eps2[keep]), xc)
        mask = to_device(batch["mask"], device).double()
        sums += torch.stack([(terms[k].double() * mask).sum() for k in keys] + [mask.sum()])
        if max_batches and n_batches >= max_batches:
            break
    sums = collectives.all_reduce(sums).tolist()
    module.train(was_training)
    n = max(sums[-1], 1.0)
    split = "val" if getattr(stream, "split", "test") == "val" else "test"
    out = {f"{split}_{k}": sums[i] / n for i, k in enumerate(keys) if k != "correct"}
    # No classifier (model.enc_capsules=False): the error is undefined, not 90%.
    out[f"{split}_error"] = 1.0 - sums[0] / n if cfg.model.enc_capsules else float("nan")
    out[f"{split}_n"] = int(sums[-1])
    if cfg.model.likelihood == "logistic":
        m = cfg.model
        out[f"{split}_bits_per_dim"] = bits_per_dim(out[f"{split}_elbo"], m.in_channels * m.height * m.width)
    return out | caps


AUTO_WORKERS_GPU = 2
"""data.num_workers=-1 on a GPU: two workers decode and binarise a batch of 64 paper-size images
in well under a paper-size step; more would only hold more batches in memory."""


def loader_workers(d, device: str, dp_size: int) -> int:
    """DataLoader workers per rank for `d` (the DataConfig): data.num_workers, or for -1 ("auto")
    none on a CPU and AUTO_WORKERS_GPU on a GPU, as many as the training shards go round to
    (each (rank, worker) slot needs a shard of its own)."""
    if d.num_workers >= 0:
        return d.num_workers
    if not device.startswith("cuda"):
        return 0
    from rcn_dist.data.loader import Manifest

    shards = len(Manifest.load(d.dir, d.cache_dir or None).shards("train"))
    return max(0, min(AUTO_WORKERS_GPU, shards // max(dp_size, 1)))


def position_from_samples(stream, samples: int, dp_size: int) -> dict[str, int]:
    """A loader position for this layout after `samples` images were seen by the whole job.

    Used after a world-size change, when the saved per-rank positions no longer apply: the
    epoch and the fraction of it are carried over, the exact sample order is not.
    """
    per_batch = stream.batch_size * dp_size
    per_epoch = stream.batches_per_epoch * per_batch
    return stream.state_dict() | {"epoch": samples // per_epoch, "batch": (samples % per_epoch) // per_batch}


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
    """SIGTERM / SIGUSR1 / SIGUSR2 stop the run: the loop acts on them at the next step boundary
    (or, for one that came before the first step, before it: setup_run).

    The signals are caught by rcn_dist.signals, from the entry point's first line (so that one
    that lands while torch is imported is kept, not fatal) to the end of the process (so that one
    during the teardown changes nothing); this flag reads what it recorded. `install()` catches
    them itself where no entry point did (an in-process call), and `restore()` then gives them
    back.

    Under submitit, its own SIGUSR2 handler (installed before ours) would requeue at once from
    task 0 alone. We hold it back: every rank first checkpoints at the step boundary, then
    `hand_over()` calls it, and it requeues the job (task 0) or returns (the other tasks).
    """

    HAND_OVER_WAIT_S = 10.0
    """How long hand_over() waits for submitit's SIGUSR2 after a SIGTERM (see there)."""

    def __init__(self) -> None:
        self._owner = False

    def install(self) -> StopFlag:
        self._owner = signals.catch()
        return self

    @property
    def received(self) -> set[int]:
        """The stop signals this process received so far."""
        return set(signals.received())

    @property
    def signum(self) -> int:
        """The first stop signal received, 0 before any."""
        got = signals.received()
        return got[0] if got else 0

    def any_rank(self) -> bool:
        """Whether any rank received a stop signal (a collective: every rank calls it)."""
        flag = torch.tensor([float(self.signum != 0)], dtype=torch.float64)
        return bool(collectives.all_reduce(flag, op="max").item() > 0)

    def restore(self) -> None:
        """Give the signals back where install() caught them (an in-process run); an entry point
        keeps them caught to the process's end."""
        if self._owner:
            signals.release()
            self._owner = False

    def hand_over(self) -> None:
        """After the checkpoint: pass the signal on to submitit's handler, if it installed one.

        SIGUSR2 wins over SIGTERM: submitit's preemption sends both, SIGTERM first
        (Job._interrupt: `scancel --signal SIGTERM`, then `--signal USR2`), and only its SIGUSR2
        handler requeues (its SIGTERM handler just logs). A stop that came from a SIGTERM alone
        therefore waits up to HAND_OVER_WAIT_S for the SIGUSR2 that may follow, which a fast
        checkpoint could otherwise outrun.
        """
        if not _is_submitit(signals.previous_handler(signal.SIGUSR2)):
            return
        deadline = time.monotonic() + self.HAND_OVER_WAIT_S
        while signal.SIGUSR2 not in self.received and signal.SIGTERM in self.received \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        signum = signal.SIGUSR2 if signal.SIGUSR2 in self.received else self.signum
        prev = signals.previous_handler(signum)
        if _is_submitit(prev):
            prev(signum, None)


def _is_submitit(handler: Any) -> bool:
    return callable(handler) and getattr(handler, "__module__", "").startswith("submitit")


@dataclass(frozen=True)
class StepFlag:
    """What the step's one all-reduce agreed on, read back to the host once."""

    parts: tuple[float, ...]
    """The TERMS batch means summed over the ranks that hold a loss."""
    stopping: bool
    """Some rank received a stop signal."""
    diverged: bool
    """Some rank's loss parts are not finite."""

    @classmethod
    def from_list(cls, values: list[float]) -> StepFlag:
        """The all-reduced vector: len(TERMS) parts, then the stop and non-finite counts."""
        n = len(TERMS)
        return cls(tuple(values[:n]), values[n] > 0, values[n + 1] > 0)


@dataclass
class Backend:
    """What differs between layouts (one DeepSpeed engine per rank, or one pipeline stack per
    rank); run_loop() does the rest: agreement, logging, eval and checkpoint cadence, stops."""

    forward_backward: Callable[[dict[str, torch.Tensor], torch.Tensor, bool], torch.Tensor | None]
    """(batch, eps, last) -> forward and backward of one of a step's train.grad_accum micro-batches,
    latent noise eps (B, T, z_dim); the TERMS batch means (5,) float64, None on ranks that hold no
    loss. After the `last` one the gradients are ready for the update."""
    update: Callable[[], Any]
    """The optimizer step, after every rank agreed the losses are finite."""
    lr: Callable[[], float]
    """The learning rate after the update."""
    evaluate: Callable[[Any, int], dict[str, Any]]
    """(stream, max_batches) -> `evaluate`'s metrics of this layout's model on the stream (collective)."""
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
    speed: speed.Speed
    """The step's speed settings (rcn_dist.speed), applied to torch already; the backend lays its
    model out with speed.prepare."""


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
    testhooks.min_step_seconds()  # a bad test knob stops every rank with one line, before the process group
    logger = make_loggers(cfg, run_dir, le.rank)  # before the process group: a missing package stops all ranks
    stop = StopFlag().install()
    init_process_group(le, deepspeed=deepspeed)
    t = cfg.train
    settings = speed.choose(le.device, t.deterministic, t.compile, t.cuda_graphs)
    speed.apply(settings)
    out = console.Console(le.rank == 0)
    if stop.any_rank():
        # A signal before the first step (e.g. while torch was imported), on any rank: stop now,
        # all ranks alike, before the model is built. Nothing was trained, so nothing is saved;
        # the next attempt starts (or resumes) from what the run directory already holds.
        out.info(f"stop signal ({signals.names(signals.received()) or 'on another rank'}) before the first "
                 f"step: nothing to checkpoint; exit {EXIT_STOPPED} (run again on {run_dir} to resume)")
        logger.close()
        try:
            _end_run(True, cfg.train.steps, out, run_dir, stop)
        finally:
            stop.restore()
        raise signals.Stopped()
    if le.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.json", cfg.to_json())
    latest, notes = ckpt.find_latest(run_dir)
    for n in notes:
        out.info(n)
    if latest is not None:
        ckpt.set_aside_damaged(run_dir, latest, le.rank)  # newer ones find_latest found damaged
    return Run(cfg, le, run_dir, out, logger, stop, latest, settings)


def run_loop(run: Run, backend: Backend) -> int:
    """Resume from run.latest if there is one, train to cfg.train.steps, then tear the process
    group down. Returns the exit code: 0, or EXIT_STOPPED after a stop signal (and a
    checkpoint). Raises Diverged, before the update, when any rank's loss is not finite."""
    from rcn_dist.data.loader import TrainStream

    cfg, le, out = run.cfg, run.le, run.out
    t, d = cfg.train, cfg.data
    cuda = le.device.startswith("cuda")
    workers = loader_workers(d, le.device, le.dp_size)
    stream = TrainStream(d.dir, t.micro_batch, le.dp_rank, le.dp_size, t.seed, num_workers=workers,
                         binarize=d.binarize, shuffle=d.shuffle, cache_dir=d.cache_dir or None, pin_memory=cuda)
    step, samples = 0, 0
    if run.latest is not None:
        state = backend.load(run.latest)
        step, samples = state["step"], state["samples"]
        loader = state["loader"]
        stream.load_state_dict(loader if loader is not None else position_from_samples(stream, samples, le.dp_size))
        out.info(f"resumed from {run.latest} (step {step})")
    progress = out.progress(total=t.steps, start=step, label=f"train {cfg.name}")
    try:
        try:
            stopped = _steps(run, backend, stream, step, samples, progress)
        finally:
            progress.close()
            run.logger.close()
        return _end_run(stopped, t.steps, out, run.run_dir, run.stop)
    finally:
        run.stop.restore()  # after the teardown: a signal during it must not kill the rank


def _steps(run: Run, backend: Backend, stream, step: int, samples: int, progress) -> bool:
    # The loop of run_loop(); True when a stop signal ended it early.

    t, rank, stop, logger, device = run.cfg.train, run.le.rank, run.stop, run.logger, run.le.device
    last_good = str(run.latest) if run.latest else "none"
    min_step_s = testhooks.min_step_seconds()
    batches = iter(stream)
    while step < t.steps:
        testhooks.fault_point("step", step, rank)
        tic = time.perf_counter()
        # The loss parts stay on the device (float64) until the step's one collective: no host
        # sync inside the micro-batches.
        parts = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
        for micro in range(t.grad_accum):
            batch = next(batches)
            eps = noise_for(batch, step_noise_seed(t.seed, step), run.cfg, device=device)
            terms = backend.forward_backward(batch, eps, micro == t.grad_accum - 1)
            if terms is not None:
                parts += terms
        if min_step_s:  # test-only: before the collective, so a signal during the sleep stops this step
            time.sleep(max(0.0, min_step_s - (time.perf_counter() - tic)))
        # One collective per step: the loss parts, any rank's stop signal, any non-finite loss,
        # agreed before the update so that a NaN never reaches the weights. Then one host read.
        stopped_here = torch.tensor([float(stop.signum != 0)], dtype=torch.float64).to(device, non_blocking=True)
        flag = StepFlag.from_list(collectives.all_reduce(torch.cat([
            parts / t.grad_accum, stopped_here, (~torch.isfinite(parts).all()).double().reshape(1)])).tolist())
        if flag.diverged:
            raise Diverged(f"loss is not finite at step {step + 1}; last good checkpoint: {last_good}")
        backend.update()
        step += 1
        samples += t.batch_size
        dt = time.perf_counter() - tic
        row = {"step": step} | {k: v / backend.loss_ranks for k, v in zip(TERMS, flag.parts)} | {
            "lr": backend.lr(), "img_per_s": t.batch_size / dt, "samples": samples}
        if rank == 0 and (step % t.log_every == 0 or step == t.steps):
            logger.log(row)
        progress.update(step, row)

        at_end = step == t.steps
        if (t.eval_every and step % t.eval_every == 0) or at_end:
            ev_stream = periodic_stream(run.cfg, t.micro_batch, run.le.dp_rank, run.le.dp_size)
            ev = backend.evaluate(ev_stream, 0 if at_end else t.eval_batches) | {
                "step": step, "kind": "eval", "full": at_end or not t.eval_batches}
            if rank == 0:
                logger.log(ev)
            progress.eval(ev)
        stopping = flag.stopping
        if (t.ckpt_every and step % t.ckpt_every == 0) or at_end or stopping:
            loop_state = {"step": step, "samples": samples, "loader": stream.state_dict()}
            last_good = str(backend.save(step, loop_state))
        if stopping and not at_end:
            run.out.info(f"stop signal ({signals.names(signals.received()) or 'on another rank'}): "
                         f"checkpointed at step {step} in {last_good}; "
                         f"exit {EXIT_STOPPED} (run again on {run.run_dir} to resume)")
            return True
    return False


def _end_run(stopped: bool, steps: int, out, run_dir: Path, stop: StopFlag) -> int:
    """After the loop, on every rank: the last line, the process group's teardown and, under
    submitit after a stop, the requeue. Returns the exit code. The stop signals stay caught
    throughout: one that comes now is recorded, and a finished run still ends with 0."""
    if not stopped:
        out.info(f"done: {steps} steps; run directory {run_dir}")
    testhooks.pause("teardown")
    collectives.destroy()
    if stopped:
        stop.hand_over()  # under submitit: task 0 requeues the job and exits here
        return EXIT_STOPPED
    if stop.received:
        out.info(f"stop signal ({signals.names(signals.received())}) after the last step: "
                 "the run is complete; exit 0")
    return 0
