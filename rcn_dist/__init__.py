"""rcn_dist: distributed training of the Recurrent Capsule Network (RCN)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rcn_dist.config import Config
    from rcn_dist.model import RCN

__version__ = "0.1.0"


def load(path: str | Path, device: str = "cpu") -> tuple[Config, RCN]:
    """(cfg, model in eval mode) from a run directory (its newest complete checkpoint), one
    checkpoint directory, or an `rcn export` directory: the short form of
    rcn_dist.parallel.checkpoint.load_model, which also says which checkpoint it read."""
    # Imported here, not at the top: `import rcn_dist` (the CLI's first import, before signal
    # handlers are set) stays free of torch.
    from rcn_dist.parallel.checkpoint import load_model

    cfg, model, _ = load_model(path, device)
    return cfg, model


__all__ = ["__version__", "load"]
