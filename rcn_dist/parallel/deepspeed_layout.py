"""The "deepspeed" layout: the whole RCN in one DeepSpeed engine per rank (ZeRO and precision from
the config and the --deepspeed JSON), every rank a data-parallel replica.

parallel.layout=auto picks it for parallel.pipeline_stages=1. A checkpoint saved by another world
size or ZeRO stage is converted to DeepSpeed's universal format first (rank 0) and loaded from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rcn_dist import speed, testhooks
from rcn_dist.config import Config, ConfigError
from rcn_dist.errors import CheckpointError
from rcn_dist.evaluation import caps_input, evaluate, to_device
from rcn_dist.model import RCN
from rcn_dist.model.losses import TERMS, LossModule
from rcn_dist.parallel import checkpoint as ckpt
from rcn_dist.parallel import collectives
from rcn_dist.parallel.engine import init_distributed, initialize
from rcn_dist.parallel.env import LaunchEnv
from rcn_dist.parallel.layouts import LayoutParts, LayoutSpec, Run, register
from rcn_dist.parallel.safety import check_checkpoint_dir

NAME = "deepspeed"


def check_resume(latest: Path, cfg: Config, launch: LaunchEnv) -> None:
    """A checkpoint from another world size or ZeRO stage is converted to DeepSpeed's universal
    format on resume; DeepSpeed loads that only into a ZeRO (1-3) optimizer."""
    saved = ckpt.saved_layout(latest)
    if saved.get("pipeline_stages", 1) != 1:
        raise ConfigError(f"{latest} is a pipeline checkpoint ({saved['pipeline_stages']} stages): resume it with "
                          f"parallel.pipeline_stages={saved['pipeline_stages']}, or evaluate it with `rcn eval`")
    if (saved["world_size"], saved["zero_stage"]) != (launch.world_size, cfg.parallel.zero_stage) \
            and cfg.parallel.zero_stage == 0:
        raise ConfigError(f"{latest} was saved by {saved['world_size']} rank(s) with ZeRO {saved['zero_stage']}; "
                          f"resuming it on {launch.world_size} rank(s) needs ZeRO stage 1, 2 or 3 "
                          f"(e.g. --deepspeed configs/ds_fp32.json), not 0")


class EngineModel:
    """The engine as rcn_dist.evaluation.Evaluable: called as the engine (its forward), put in
    eval mode through the module it wraps (a LossModule), whose RCN gives the capsule figures."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @property
    def rcn(self) -> torch.nn.Module:
        return self.engine.module.rcn

    @property
    def training(self) -> bool:
        return self.engine.module.training

    def train(self, mode: bool = True) -> None:
        self.engine.module.train(mode)

    def __call__(self, x, y, eps, x_caps=None) -> dict[str, torch.Tensor]:
        return self.engine(x, y, eps, x_caps=x_caps)


def _verify_loaded_weights(engine, ckpt_dir: Path, rank0: bool, out) -> None:
    """After a layout change, check the loaded model against the checkpoint's consolidated
    weights (model.safetensors): the conversion must carry the model state over exactly."""
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
    # deepspeed is imported where an engine is used (parallel/engine.py): the registry imports
    # this module for every run, a pipeline run too.
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

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


def build(run: Run) -> LayoutParts:
    """The whole RCN in one DeepSpeed engine on this rank, resuming run.latest if there is one."""
    cfg, launch, out, latest, ds = run.cfg, run.launch, run.out, run.latest, run.engine_json
    train_cfg, rank0, device = cfg.train, launch.rank == 0, launch.device
    out.info(f"{launch.launcher}: {launch.world_size} rank(s), {launch.backend} on {launch.device}; "
             f"{cfg.name} preset, ZeRO {cfg.parallel.zero_stage}, {train_cfg.precision}, "
             f"global batch {train_cfg.batch_size} = {train_cfg.micro_batch} x {train_cfg.grad_accum} x "
             f"{launch.dp_size}")
    universal = False
    if latest is not None:
        saved = ckpt.saved_layout(latest)
        universal = (saved["world_size"], saved["zero_stage"]) != (launch.world_size, cfg.parallel.zero_stage)
        if universal:
            out.info(f"{latest} was saved by {saved['world_size']} rank(s) with ZeRO {saved['zero_stage']}; "
                     f"converting it to DeepSpeed's universal format for {launch.world_size} with ZeRO "
                     f"{cfg.parallel.zero_stage}")
            check_checkpoint_dir(latest)  # every rank: a bad file is refused on all, none waits
            if rank0:
                ckpt.to_universal(latest)
            collectives.barrier()
            ds = ds | {"checkpoint": {"load_universal": True}}

    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
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
        state = ckpt.load(engine, d, launch.rank, universal=universal)
        if universal:
            _verify_loaded_weights(engine, d, rank0, out)
            state = state | {"loader": None}  # the saved per-rank positions are another layout's
        if dump := testhooks.dump_loaded_state_path():
            _dump_loaded_state(engine, dump, rank0)
        return state

    evaluable = EngineModel(engine)
    return LayoutParts(
        forward_backward=forward_backward, update=engine.step, lr=lambda: scheduler.get_last_lr()[0],
        evaluate=lambda stream, max_batches: evaluate(evaluable, stream, cfg, device, max_batches),
        save=lambda step, loop_state: ckpt.save(engine, run.run_dir, step, loop_state, cfg, launch.rank,
                                                launch.world_size, train_cfg.keep_last),
        load=load, loss_ranks=launch.world_size)


SPEC = register(LayoutSpec(
    name=NAME, build=build, check_resume=check_resume, pipeline_stages=1, auto=True,
    init_comm=lambda launch: init_distributed(launch.backend),
    describe="the whole model in one DeepSpeed engine per rank"))
