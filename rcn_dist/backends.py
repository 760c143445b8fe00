"""The two layouts as loop.Backend objects: one DeepSpeed engine per rank, or a 2-stage pipeline.

Each builder takes a started loop.Run (process group up, the checkpoint to resume found), builds
the model and its optimizer for this rank and returns the Backend that loop.run_loop drives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rcn_dist import speed, testhooks
from rcn_dist.errors import CheckpointError
from rcn_dist.loop import TERMS, Backend, LossModule, Run, caps_input, evaluate, to_device
from rcn_dist.parallel import collectives


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


def _dump_loaded_state(engine, path: str, rank0: bool) -> None:
    """Test hook (testhooks.dump_loaded_state_path): rank 0 writes what the engine holds right after a
    resume's load, consolidated over the ranks (a collective): per parameter the fp32 weights
    ("fp32/NAME"), Adam's "exp_avg/NAME" and "exp_avg_sq/NAME", and "step" and "lr", in one
    safetensors file (ZeRO 1-3 engines). tests/test_layouts.py compares it with the checkpoint's
    own files."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    dump = {}
    for name, p in engine.module.named_parameters():
        name = name.removeprefix("rcn.")
        dump[f"fp32/{name}"] = safe_get_full_fp32_param(p)
        for key in ("exp_avg", "exp_avg_sq"):
            dump[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key)
    steps = {float(s["step"]) for s in engine.optimizer.optimizer.state.values()}
    if rank0:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in dump.items()}
                  | {"step": torch.tensor(sorted(steps)), "lr": torch.tensor(engine.get_lr()[0], dtype=torch.float64)},
                  path)


def deepspeed_backend(run: Run, ds: dict[str, Any]) -> Backend:
    """The whole RCN in one DeepSpeed engine per rank (ZeRO and precision from the config + JSON).

    A checkpoint saved by another world size or ZeRO stage is converted to DeepSpeed's universal
    format first (rank 0) and loaded from it."""

    from rcn_dist.model import RCN
    from rcn_dist.parallel import checkpoint as ckpt
    from rcn_dist.parallel.engine import initialize
    from rcn_dist.parallel.safety import check_checkpoint_dir

    cfg, le, out, latest = run.cfg, run.le, run.out, run.latest
    t, rank0, device = cfg.train, le.rank == 0, le.device
    out.info(f"{le.launcher}: {le.world_size} rank(s), {le.backend} on {le.device}; "
             f"{cfg.name} preset, ZeRO {cfg.parallel.zero_stage}, {t.precision}, "
             f"global batch {t.batch_size} = {t.micro_batch} x {t.grad_accum} x {le.dp_size}")
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
            collectives.barrier()
            ds = ds | {"checkpoint": {"load_universal": True}}

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = speed.prepare(LossModule(RCN(cfg.model)), run.speed)
    engine, _, scheduler = initialize(model, cfg, ds, fused_adam=run.speed.fused_adam)

    def forward_backward(batch: dict, eps: torch.Tensor, last: bool) -> torch.Tensor:
        speed.step_begins(run.speed)
        x, y = to_device(batch["image"], device), to_device(batch["label"], device)
        terms = engine(x, y, eps, x_caps=caps_input(batch, cfg, device))
        engine.backward(terms["loss"].mean())
        parts = torch.stack([terms[k].detach().mean() for k in TERMS]).double()  # (5,) on the device
        if not last:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        return parts

    def load(d: Path) -> dict[str, Any]:
        state = ckpt.load(engine, d, le.rank, universal=universal)
        if universal:
            _verify_loaded_weights(engine, d, rank0, out)
            state = state | {"loader": None}  # the saved per-rank positions are another layout's
        if dump := testhooks.dump_loaded_state_path():
            _dump_loaded_state(engine, dump, rank0)
        return state

    return Backend(
        forward_backward=forward_backward, update=engine.step, lr=lambda: scheduler.get_last_lr()[0],
        evaluate=lambda stream, max_batches: evaluate(engine, stream, cfg, device, max_batches),
        save=lambda step, loop_state: ckpt.save(engine, run.run_dir, step, loop_state, cfg, le.rank, le.world_size,
                                                t.keep_last),
        load=load, loss_ranks=le.world_size)


def pipeline_backend(run: Run) -> Backend:
    """The RCN split over a 2-stage pipeline (rcn_dist.parallel.pipeline): the encoder stack on
    even ranks, the decoder stack on odd ones; same rows, evaluation, checkpoints (model.safetensors
    holds the full RCN), stop protocol and exit codes as the DeepSpeed backend."""
    from rcn_dist.parallel import pipeline as pp

    cfg, le, out = run.cfg, run.le, run.out
    t, p = cfg.train, cfg.parallel
    pp_group, dp_group = pp.make_groups(le.world_size)
    out.info(f"{le.launcher}: {le.world_size} rank(s) = {le.dp_size} pipeline(s) x 2 stages, {le.backend} on "
             f"{le.device}; {cfg.name} preset, {p.pipeline_schedule} with {p.micro_batches} micro-batch(es), "
             f"ZeRO {p.zero_stage}, {t.precision}, global batch {t.batch_size} = {t.micro_batch} x "
             f"{t.grad_accum} x {le.dp_size}")
    runner = pp.PipelineRank(cfg, le.pp_rank, pp_group, dp_group, device=le.device)
    speed.prepare(runner.stack, run.speed)

    def forward_backward(batch: dict, eps: torch.Tensor, last: bool) -> torch.Tensor | None:
        speed.step_begins(run.speed)
        terms = runner.forward_backward(batch["image"], batch["label"], eps, t.micro_batch * t.grad_accum,
                                        x_caps=caps_input(batch, cfg, le.device))
        # The decoder rank holds the loss terms; (5,) on the device.
        return None if terms is None else terms[:, :len(TERMS)].double().mean(0)

    def update() -> None:
        runner.optimizer_step(runner.reduce_gradients())

    return Backend(
        forward_backward=forward_backward, update=update, lr=lambda: runner.scheduler.get_last_lr()[0],
        evaluate=lambda stream, max_batches: evaluate(
            runner, pp.masked_on_encoder_rank(stream, le.pp_rank), cfg, le.device, max_batches),
        save=lambda step, loop_state: pp.save_checkpoint(runner, run.run_dir, step, loop_state, cfg, le,
                                                         t.keep_last),
        load=lambda d: pp.load_checkpoint(runner, d, le), loss_ranks=le.dp_size)
