"""`rcn train` and launch/train.py: the arguments, the checks before start-up, the layout.

Launched by the `deepspeed` launcher, torchrun, srun, mpirun or as one plain process, it does
the same run: WebDataset shards split by data-parallel rank, evaluation every N steps,
metrics.jsonl, checkpoints that resume exactly, and a cooperative stop on SIGTERM/SIGUSR1/SIGUSR2
(rcn_dist.loop). parallel.pipeline_stages picks the layout (rcn_dist.backends): 1, one DeepSpeed
engine per rank (ZeRO and precision from the config + JSON); 2, the model split over a 2-stage
pipeline.

Exit codes: 0 finished; 3 stopped on a signal after a checkpoint (resumable: run again on the
same RUN_DIR); 2 bad input or configuration; 4 the loss became NaN/inf.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rcn_dist.config import Config, ConfigError, model_diff, resolve
from rcn_dist.errors import CheckpointError


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
    run_dir = Path(args.out)
    if cfg.parallel.pipeline_stages > 1:
        from rcn_dist.parallel.pipeline import check_pipeline_config

        check_pipeline_config(cfg, le, run_dir)  # also checks the layout of a checkpoint to resume
    check_fits(cfg, le)  # refuse now what would run out of memory at step 1
    manifest = Manifest.load(cfg.data.dir, cache_dir=cfg.data.cache_dir or None)
    shape = tuple(manifest.image_shape)
    want = (cfg.model.in_channels, cfg.model.height, cfg.model.width)
    if shape != want:
        raise ConfigError(f"data {cfg.data.dir} holds {shape[0]}x{shape[1]}x{shape[2]} images, the model "
                          f"expects model.in_channels/height/width = {want[0]}x{want[1]}x{want[2]}")
    if diff := model_diff(run_dir / "config.json", cfg):  # another model's run is refused, not overwritten
        raise CheckpointError(f"{run_dir} holds a run with a different model config "
                              f"(model.{', model.'.join(diff[:4])} differ): use another --out")
    if cfg.parallel.pipeline_stages == 1:
        _check_resume_layout(run_dir, cfg, le)
    return cfg, ds, le, manifest, run_dir


def run(args: argparse.Namespace) -> int:
    """Check, start the run, build the layout's backend and train (rcn_dist.loop.run_loop)."""
    from rcn_dist.backends import deepspeed_backend, pipeline_backend
    from rcn_dist.loop import run_loop, setup_run

    cfg, ds, le, _, run_dir = prepare_run(args)
    pipeline = cfg.parallel.pipeline_stages > 1
    run = setup_run(cfg, le, run_dir, deepspeed=not pipeline)
    # `ds` (the DeepSpeed JSON) gives the pipeline only what resolve_engine_settings folded into
    # cfg: ZeRO stage and precision.
    backend = pipeline_backend(run) if pipeline else deepspeed_backend(run, ds)
    return run_loop(run, backend)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return run(args)
