"""`rcn train` and launch/train.py: the arguments, the checks before start-up, the layout.

Launched by the `deepspeed` launcher, torchrun, srun, mpirun or as one plain process, it does
the same run: WebDataset shards split by data-parallel rank, evaluation every N steps,
metrics.jsonl, checkpoints that resume exactly, and a cooperative stop on SIGTERM/SIGUSR1/SIGUSR2
(rcn_dist.loop). The layout is the registry's (rcn_dist.parallel.layouts: parallel.layout, or
for "auto" the one for parallel.pipeline_stages); nothing here names one.

Exit codes: 0 finished; 3 stopped on a signal after a checkpoint (resumable: run again on the
same RUN_DIR); 2 bad input or configuration; 4 the loss became NaN/inf.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rcn_dist.config import Config, ConfigError, model_diff, resolve
from rcn_dist.data.loader import Manifest
from rcn_dist.errors import CheckpointError
from rcn_dist.loop import run_loop, setup_run
from rcn_dist.memory import check_fits
from rcn_dist.parallel import layouts
from rcn_dist.parallel.engine import load_ds_json, resolve_engine_settings
from rcn_dist.parallel.env import detect


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
    flags = (("data.dir", args.data or None), ("train.steps", args.steps), ("train.seed", args.seed))
    overrides = list(args.overrides) + [f"{key}={value}" for key, value in flags if value is not None]
    if not args.preset and not args.config:
        raise ConfigError("give --preset NAME or --config FILE")
    return resolve(args.preset, args.config, overrides)


def prepare_run(args: argparse.Namespace):
    """Everything that can be checked before a process group starts: the config, the layout's
    own checks, the memory estimate, the data, the run directory's model. The checkpoint to
    resume is checked once the ranks can agree on it (loop.setup_run)."""
    cfg = config_from_args(args)
    engine_json = load_ds_json(args.deepspeed)
    spec = layouts.choose(cfg)
    launch = detect(pipeline_stages=spec.pipeline_stages)
    if launch.world_size % spec.pipeline_stages:
        raise ConfigError(f"world size {launch.world_size} is not divisible by parallel.pipeline_stages="
                          f"{spec.pipeline_stages}")
    resolve_engine_settings(cfg, engine_json, launch.dp_size, launch.device)
    spec.check_config(cfg, launch)
    check_fits(cfg, launch)  # refuse now what would run out of memory at step 1
    manifest = Manifest.load(cfg.data.dir, cache_dir=cfg.data.cache_dir or None)
    shape = tuple(manifest.image_shape)
    want = (cfg.model.in_channels, cfg.model.height, cfg.model.width)
    if shape != want:
        raise ConfigError(f"data {cfg.data.dir} holds {shape[0]}x{shape[1]}x{shape[2]} images, the model "
                          f"expects model.in_channels/height/width = {want[0]}x{want[1]}x{want[2]}")
    run_dir = Path(args.out)
    if diff := model_diff(run_dir / "config.json", cfg):  # another model's run is refused, not overwritten
        raise CheckpointError(f"{run_dir} holds a run with a different model config "
                              f"(model.{', model.'.join(diff[:4])} differ): use another --out")
    return cfg, engine_json, spec, launch, manifest, run_dir


def run(args: argparse.Namespace) -> int:
    """Check, start the run, build its layout (the registry's) and train (rcn_dist.loop.run_loop)."""
    cfg, engine_json, spec, launch, _, run_dir = prepare_run(args)
    run = setup_run(cfg, launch, run_dir, spec, engine_json)
    return run_loop(run, spec.build(run))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return run(args)
