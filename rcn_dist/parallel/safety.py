"""Loading DeepSpeed checkpoints without running code from them, and files nobody else can write.

DeepSpeed unpickles its checkpoint files freely (torch.load(weights_only=False)). Both guards use
torch's weights-only unpickler plus the few DeepSpeed classes of `_allowed_globals`:
`check_checkpoint_dir` reads every *.pt file of a checkpoint on every rank before DeepSpeed opens
any (so all ranks refuse together, naming the same file), and `make_engine_loads_safe` routes
DeepSpeed's own reads through it. docs/security.md has the reasoning and the allowlist's sources.
"""

from __future__ import annotations

import enum
import importlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from rcn_dist.errors import UnsafeFileError


def _allowed_globals() -> list[Any]:
    """DeepSpeed classes its own checkpoints contain: plain data holders whose unpickling only
    sets attributes (an Enum is looked up by value), so admitting them runs no code of the file's."""
    allowed: list[Any] = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          # ZeRO 1/2 optimizer partitions map parameters to (numel, start) records
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            allowed += [getattr(importlib.import_module(module), n) for n in names]
        except (ImportError, AttributeError):
            pass
    # Some Python versions (Debian's 3.11.2; not 3.11.7) pickle an Enum member as
    # getattr(cls, name): admit that call under the name builtins.getattr, but only for a member
    # of an Enum admitted above.
    enums = tuple(c for c in allowed if isinstance(c, type) and issubclass(c, enum.Enum))

    def enum_member(cls: Any, name: str) -> Any:
        if cls in enums and isinstance(name, str) and name in cls.__members__:
            return cls[name]
        raise pickle.UnpicklingError(f"getattr({getattr(cls, '__name__', cls)!s}, {name!r}) is not a "
                                     "member of an admitted enum")

    return allowed + [(enum_member, "builtins.getattr")]


def _why(e: Exception) -> str:
    """The line of torch's refusal that names the offending global, not its advice to reload
    the file unsafely."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln[:200]
    return (lines[-1] if lines else type(e).__name__)[:200]


def safe_torch_load(path: str | Path, map_location: Any = None, mmap: bool = False) -> Any:
    """torch.load with weights_only=True and DeepSpeed's data classes admitted.

    Raises UnsafeFileError naming the file for anything else (before any of it runs), and for
    a file that is not a torch checkpoint at all.
    """
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"{path}: refused to unpickle, it holds more than tensors and plain data "
                              f"({_why(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UnsafeFileError(f"{path}: not a readable checkpoint file ({_why(e)})") from None


def check_checkpoint_dir(ckpt_dir: str | Path) -> None:
    """Refuse a checkpoint directory if any *.pt file in it or below it (a universal
    checkpoint's zero/<param>/*.pt) holds more than weights-only data."""
    for f in sorted(Path(ckpt_dir).rglob("*.pt")):
        safe_torch_load(f, map_location="cpu", mmap=True)


def make_engine_loads_safe(engine: Any, own_universal: bool = False) -> None:
    """Route every file DeepSpeed reads for this engine through safe_torch_load.

    own_universal: the engine loads a universal checkpoint that checkpoint.to_universal wrote.
    DeepSpeed's universal loader reads it with its own unrestricted torch.load, so the caller
    must have passed every file it reads through check_checkpoint_dir just before (a
    `universal/` folder found in a checkpoint may not be ours: checkpoint.load checks it).
    """
    if engine.load_universal_checkpoint() and not own_universal:
        raise UnsafeFileError("checkpoint.load_universal in the DeepSpeed JSON: DeepSpeed's universal "
                              "checkpoint loader unpickles files without restriction; it is not supported")

    def load(path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)

    engine.checkpoint_engine.load = load


def restrict_umask() -> int:
    """Add o-w to this process's umask, so that nothing it creates is world-writable whatever
    umask it was started with; the rest of the user's umask is kept. Returns the new umask."""
    mask = os.umask(0) | 0o002
    os.umask(mask)
    return mask
