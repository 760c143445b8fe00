"""Loading DeepSpeed checkpoints without running code from them.

DeepSpeed's TorchCheckpointEngine.load calls torch.load(..., weights_only=False): a crafted
checkpoint would run arbitrary code on unpickling. Every file DeepSpeed reads while loading goes
through `engine.checkpoint_engine.load` (model states, ZeRO optimizer partitions, the state-dict
loader), so we replace that one method on our engine with a weights_only load that admits,
beside tensors and containers, only the few DeepSpeed classes its checkpoints hold (listed
below; each was seen in a real checkpoint). Anything else is refused, naming the file, before
any of it runs. See docs/security.md.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from rcn_dist.errors import UnsafeFileError


def _allowed_globals() -> list[Any]:
    """DeepSpeed classes its own checkpoints contain (plain data holders, no code on load)."""
    allowed: list[Any] = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    return allowed


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load with weights_only=True and DeepSpeed's data classes admitted; UnsafeFileError
    (naming the file) for anything else."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(f"{path}: refused to unpickle (it holds more than tensors and plain data: "
                              f"{first[:200]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UnsafeFileError(f"{path}: not a readable checkpoint file ({str(e).splitlines()[0][:200]})") from None


def make_engine_loads_safe(engine: Any) -> None:
    """Route every file DeepSpeed reads for this engine through safe_torch_load."""
    ce = engine.checkpoint_engine

    def load(path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)

    ce.load = load
