"""Where the loop's metric rows go: metrics.jsonl always, TensorBoard and W&B when asked for.

    logger = make_loggers(cfg, run_dir, rank)   # train.loggers = "jsonl,tensorboard"
    logger.log({"step": 3, "loss": 412.5, ...})  # rows with "kind": "eval" go under eval/
    logger.close()

Only rank 0 writes; other ranks get a logger that does nothing. W&B runs offline unless
WANDB_MODE says otherwise: training never waits on the network (docs/cluster.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from rcn_dist.config import Config, ConfigError


class Logger:
    """metrics.jsonl (opened per row, so a kill loses nothing) and, when named, the scalars in
    RUN_DIR/tensorboard and a W&B run in RUN_DIR/wandb (resumed runs append to it); no run_dir: a no-op."""

    def __init__(self, cfg: Config, run_dir: Path | None, names: list[str]) -> None:
        self.path, self.writer, self.run = None, None, None
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter  # local: an optional extra, only if asked

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=30)
        if "wandb" in names:
            import wandb  # local: an optional extra, only if asked

            run_dir.joinpath("wandb").mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project="rcn_dist", name=run_dir.name, dir=str(run_dir),
                                  id="rcn-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12],
                                  resume="allow", mode=os.environ.get("WANDB_MODE", "offline"),
                                  config=cfg.to_dict())

    def log(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        # The scalars, {"train/loss": ..., "eval/test_elbo": ...}; non-numbers are left out.
        prefix = "eval" if row.get("kind") == "eval" else "train"
        vals = {f"{prefix}/{k}": float(v) for k, v in row.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(row["step"])
        if self.writer is not None:
            for k, v in vals.items():
                self.writer.add_scalar(k, v, step)
        if self.run is not None:
            self.run.log(vals, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


def logger_names(cfg: Config) -> list[str]:
    """train.loggers as a list, "jsonl" first and always present."""
    names = [n.strip() for n in cfg.train.loggers.split(",") if n.strip()]
    return list(dict.fromkeys(["jsonl", *names]))


def make_loggers(cfg: Config, run_dir: str | Path, rank: int) -> Logger:
    """The loggers train.loggers names, writing into run_dir on rank 0 (a no-op elsewhere).

    Every rank checks that the packages are installed, so that a missing one stops all ranks
    alike with one line (ConfigError) instead of only rank 0.
    """
    names = logger_names(cfg)
    for n in names[1:]:  # each one's package and extra are named after it
        if importlib.util.find_spec(n) is None:
            raise ConfigError(f"train.loggers asks for {n}, but the {n} package is not installed: "
                              f"pip install 'rcn_dist[{n}]'")
    return Logger(cfg, Path(run_dir) if rank == 0 else None, names)
