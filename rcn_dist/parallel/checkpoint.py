"""Checkpoints: DeepSpeed's own format for the engine, plus what DeepSpeed does not keep.

Layout of RUN_DIR/checkpoints/:

    step_00000100/
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files (ZeRO shards restore)
        loop_rank{r}.json      every rank's loop state: step, epoch, samples seen, its loader
                               position (DeepSpeed keeps client state from one rank only)
        rng_rank{r}.safetensors  every rank's torch RNG state, as a tensor
        model.safetensors      consolidated weights (rank 0): eval, sample and export read this,
                               in one process, whatever the rank layout, with no pickle
        config.json            the resolved config
        COMPLETE               written by rank 0 after every rank finished (JSON summary, with
                               the size and CRC32 of every other file of the checkpoint)
    latest                     the newest COMPLETE tag, replaced atomically, written last
    damaged_step_00000100/     a checkpoint found damaged at resume, moved aside (never deleted)

COMPLETE is the commit point. A directory without it (a kill in the middle of a save) is never
resumed from and is removed by the next successful save; pruning removes a checkpoint's COMPLETE
before its files. A resume takes the newest checkpoint whose files all still have the size and
CRC32 its COMPLETE records (`find_latest`; `latest` may lag one save behind after a kill between
the two writes); a damaged newer one is reported in one line and moved aside (`set_aside_damaged`).

Durability order (a power loss, not only a kill): every rank fsyncs the files and directories
of the checkpoint it wrote, then rank 0 writes COMPLETE (fsynced, with its directory), fsyncs
checkpoints/, and only then replaces `latest` (rcn_dist.files: fsync_tree, atomic_write).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rcn_dist import testhooks
from rcn_dist.config import Config, from_dict, model_diff
from rcn_dist.errors import CheckpointError
from rcn_dist.files import atomic_write, fsync_dir, fsync_tree
from rcn_dist.model import RCN
from rcn_dist.parallel import collectives
from rcn_dist.parallel.safety import check_checkpoint_dir, make_engine_loads_safe, safe_torch_load

LATEST = "latest"
COMPLETE = "COMPLETE"
DAMAGED = "damaged_"
"""Prefix of a damaged checkpoint moved aside: damaged_step_00000100 (not matched by step_*)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _manifest(d: Path) -> dict[str, list[int]]:
    """{relative path: [size, CRC32]} of every file of a checkpoint but COMPLETE (rank 0, at
    commit: one more read of what was just written, ~2.5 GB/s)."""
    files = {}
    for f in sorted(d.rglob("*")):
        rel = f.relative_to(d).as_posix()
        if f.is_file() and rel != COMPLETE and not f.name.startswith("."):
            files[rel] = [f.stat().st_size, _crc32(f)]
    return files


def damage(d: Path) -> str | None:
    """What is wrong with a checkpoint that has COMPLETE, or None if every file it records is
    there with its recorded size and CRC32. A checkpoint written before COMPLETE recorded its
    files (no "files" key) is taken as it is."""
    try:
        summary = json.loads((d / COMPLETE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{COMPLETE}: not readable JSON"
    if not isinstance(summary, dict):
        return f"{COMPLETE}: not a JSON object"
    files = summary.get("files")
    if files is None:
        return None
    if not isinstance(files, dict):
        return f"{COMPLETE}: malformed file list"
    for name, rec in sorted(files.items()):
        if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)*", name) or ".." in name.split("/"):
            return f"{COMPLETE}: names {name[:80]!r}, not a file of this checkpoint"
        f = d / name
        try:
            size = f.stat().st_size
            if size != rec[0]:
                return f"{name}: {size} bytes, {rec[0]} when saved"
            if _crc32(f) != rec[1]:
                return f"{name}: contents changed since it was saved (CRC32 mismatch)"
        except FileNotFoundError:
            return f"{name}: missing"
        except OSError as e:
            return f"{name}: not readable ({e.strerror or e})"
    return None


def _damage_cached(d: Path) -> str | None:
    # find_latest and set_aside_damaged (rank 0, at a run's start) look up the same checkpoints:
    # verify each once per process, keyed by its COMPLETE's inode, mtime and size.
    try:
        st = (d / COMPLETE).stat()
    except OSError:
        return f"{COMPLETE}: missing"
    return _damage_of(d, st.st_ino, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _damage_of(d: Path, *complete_stat: int) -> str | None:
    return damage(d)


def aside_path(d: Path) -> Path:
    """Where a damaged checkpoint goes: damaged_<tag> beside it (.1, .2, ... if taken)."""
    out, n = d.with_name(DAMAGED + d.name), 0
    while out.exists():
        n += 1
        out = d.with_name(f"{DAMAGED}{d.name}.{n}")
    return out


def find_latest(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest intact complete checkpoint of a run, and one note per checkpoint passed over
    (incomplete ones newer than it; damaged ones, each with its first bad file).

    Reads and CRCs the candidates, so a run calls it on rank 0 only (agree_latest tells the
    others). `latest` is never read: it is written for people and
    other tools, and a resume cannot be led outside the run by it. Raises CheckpointError when
    complete checkpoints exist but every one is damaged: starting afresh over them would lose them.
    """
    root = ckpt_root(run_dir)
    notes: list[str] = []
    if not root.is_dir():
        return None, notes
    tags = sorted(d for d in root.glob("step_*") if re.fullmatch(r"step_\d+", d.name) and d.is_dir())
    complete = [d for d in tags if (d / COMPLETE).is_file()]
    best, damaged = None, []
    for d in reversed(complete):
        why = _damage_cached(d)
        if why is None:
            best = d
            break
        damaged.append((d, why))
    if damaged and best is None:
        listed = "; ".join(f"{d.name}: {why}" for d, why in damaged)
        raise CheckpointError(f"no intact checkpoint in {root}, every complete one is damaged ({listed}); "
                              "to train afresh in this run directory, move them aside")
    for d in tags:
        if not (d / COMPLETE).is_file() and (best is None or d.name > best.name):
            notes.append(f"{d} is incomplete (interrupted while saving): ignored")
    for d, why in damaged:
        notes.append(f"checkpoint {d} is damaged ({why}): resuming from {best.name}, the newest intact one; "
                     f"{d.name} is kept, moved aside to {aside_path(d).name}")
    return best, notes


def agree_latest(run_dir: str | Path, rank: int) -> tuple[Path | None, list[str]]:
    """Collective, at a run's start: find_latest on rank 0 alone (it reads and CRCs the
    candidates), its answer broadcast, so that every rank resumes from the checkpoint rank 0
    checked, and a CheckpointError (every complete one damaged) is raised on every rank alike.
    Without a process group, find_latest itself."""
    answer: tuple[str | None, list[str], str | None] = (None, [], None)
    if rank == 0:
        try:
            best, notes = find_latest(run_dir)
            answer = (None if best is None else best.name, notes, None)
        except CheckpointError as e:
            answer = (None, [], str(e))
    tag, notes, error = collectives.broadcast_object(answer)
    if error is not None:
        raise CheckpointError(error)
    return (None if tag is None else ckpt_root(run_dir) / tag), notes


def set_aside_damaged(run_dir: str | Path, resumed: Path, rank: int) -> list[Path]:
    """Collective, when a run resumes from `resumed`: rank 0 moves every complete checkpoint
    newer than it (find_latest passed over them as damaged) to damaged_<tag>, where neither a
    save of the same step nor pruning touches it. Returns the new paths (rank 0)."""
    collectives.barrier()  # every rank is done with them (agree_latest); a no-op without a group
    moved = []
    if rank == 0:
        for d in sorted(ckpt_root(run_dir).glob("step_*")):
            if d.name > resumed.name and (d / COMPLETE).is_file() and _damage_cached(d) is not None:
                dst = aside_path(d)
                os.replace(d, dst)
                moved.append(dst)
    return moved


def commit(run_dir: str | Path, step: int, loop_state: dict[str, Any], cfg: Config, rank: int, world_size: int,
           keep_last: int, write_state: Callable[[Path], None], weights: Callable[[Path], dict[str, torch.Tensor]],
           layout: dict[str, Any] | None = None) -> Path:
    """Collective, at one step boundary on every rank: the commit protocol of every layout.

    `write_state(d)` writes this rank's engine and optimizer files into the checkpoint directory;
    `weights(d)` (called on every rank after it) returns the full model's weights on rank 0.
    Then every rank's loop state and RNG; rank 0 writes model.safetensors and config.json, and,
    after every rank is done, COMPLETE (step, world size, ZeRO stage and `layout`), `latest`,
    and prunes to the newest `keep_last` complete checkpoints.
    """
    root = ckpt_root(run_dir)
    d = root / tag_for(step)
    if rank == 0:
        if (d / COMPLETE).is_file():  # passed over at resume (damaged): kept, never deleted
            os.replace(d, aside_path(d))
        elif d.exists():  # a leftover of an interrupted save of this very step
            shutil.rmtree(d)
        d.mkdir(parents=True)
    collectives.barrier()
    write_state(d)
    testhooks.fault_point("checkpoint", step, rank)
    atomic_write(d / f"loop_rank{rank}.json", json.dumps(loop_state, sort_keys=True))
    save_file(rng_state(), str(d / f"rng_rank{rank}.safetensors"))
    full = weights(d)
    if rank == 0:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in full.items()}, str(d / "model.safetensors"))
        atomic_write(d / "config.json", cfg.to_json())
    # Every rank's files on the disk before rank 0 writes COMPLETE: a power loss after COMPLETE
    # must not leave a checkpoint that claims to be whole (each rank flushes what it wrote; a
    # file another rank wrote is already clean, and fsync of a clean file costs nothing).
    fsync_tree(d)
    collectives.barrier()
    if rank == 0:
        summary = {"step": step, "world_size": world_size, "zero_stage": cfg.parallel.zero_stage,
                   **(layout or {}), "time": time.time(), "files": _manifest(d)}
        atomic_write(d / COMPLETE, json.dumps(summary))  # fsynced, and d's entry for it
        fsync_dir(root)  # d's own entry in checkpoints/, before `latest` names it
        testhooks.fault_point("complete", step, rank)
        atomic_write(root / LATEST, d.name)
        _prune(root, keep_last, step)
    collectives.barrier()
    return d


def save(engine, run_dir: str | Path, step: int, loop_state: dict[str, Any], cfg: Config,
         rank: int, world_size: int, keep_last: int) -> Path:
    """Collective: a DeepSpeed engine's checkpoint (commit() around DeepSpeed's own files)."""

    def write_state(d: Path) -> None:
        # universal_checkpoint_info lets deepspeed.checkpoint.ds_to_universal convert this checkpoint
        # for another world size (a resume on fewer or more ranks).
        with _fault_inside_engine_save(engine, step, rank):
            engine.save_checkpoint(str(d.parent), tag=d.name, save_latest=False,
                                   client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})

    return commit(run_dir, step, loop_state, cfg, rank, world_size, keep_last, write_state,
                  lambda d: consolidated_state_dict(engine))


@contextmanager
def _fault_inside_engine_save(engine, step: int, rank: int) -> Iterator[None]:
    """Fault point "ds_save": every file DeepSpeed's save_checkpoint writes goes through
    engine.checkpoint_engine.save; only while a test asks for this point is that wrapped."""
    if not testhooks.fault_armed("ds_save"):
        yield
        return
    ce = engine.checkpoint_engine
    original = ce.save

    def save(*args, **kwargs):
        out = original(*args, **kwargs)
        testhooks.fault_point("ds_save", step, rank)
        return out

    ce.save = save
    try:
        yield
    finally:
        del ce.save  # the class's method again


def _prune(root: Path, keep_last: int, step: int) -> None:
    """Keep the newest `keep_last` complete checkpoints. A pruned checkpoint loses its COMPLETE
    first, so a kill while its files go leaves an incomplete directory, never resumed from."""
    tags = sorted(d for d in root.glob("step_*") if d.is_dir())
    complete = [d for d in tags if (d / COMPLETE).is_file()]
    keep = set(complete[-keep_last:])
    for d in tags:
        if d not in keep:
            if (d / COMPLETE).is_file():
                (d / COMPLETE).unlink()
                testhooks.fault_point("prune", step)
            shutil.rmtree(d, ignore_errors=True)


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full model weights on rank 0 (ZeRO-3 gathers them: a collective on every rank)."""
    if engine.zero_optimization_partition_weights():
        sd = engine._zero3_consolidated_16bit_state_dict() or {}
    else:
        sd = engine.module.state_dict()
    # The engine wraps RCN in model.losses.LossModule: keys start with "rcn.".
    return {k.removeprefix("rcn."): v for k, v in sd.items()}


def saved_layout(ckpt_dir: Path) -> dict[str, Any]:
    """What the COMPLETE marker of a checkpoint records: step, world_size, zero_stage."""
    return json.loads((ckpt_dir / COMPLETE).read_text())


_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _complete_for_any_stage(udir: Path) -> None:
    """Complete a universal checkpoint being written by to_universal for engines of either ZeRO kind.

    DeepSpeed 0.19's converter writes only what an engine of the saving kind (ZeRO 1-2, or 3)
    reads, and a ZeRO-3 -> ZeRO-1 or ZeRO-2 -> ZeRO-3 resume failed. A ZeRO 1-2 engine reads
    mp_rank_00_model_states.pt, ds_version in zero/optimizer_state.pt, and per parameter
    zero/<param>/step.pt and {"param": shaped tensor} files; a ZeRO-3 engine reads
    zero_pp_rank_0_mp_rank_00_model_states.pt and the step in optimizer_state.pt's
    optimizer_state_dict (and takes either form of the parameter files). The missing side is
    filled in from the other, values unchanged. Runs in to_universal's temporary directory,
    before its DONE marker, so a crash leaves nothing half done and a resume never repeats it."""

    meta = safe_torch_load(udir / next(n for n in _MODEL_STATES if (udir / n).is_file()))
    for name in _MODEL_STATES:
        if not (udir / name).is_file():
            torch.save(meta, udir / name)
    opt_file = udir / "zero" / "optimizer_state.pt"
    opt = safe_torch_load(opt_file)
    params = sorted(d for d in opt_file.parent.iterdir() if d.is_dir())
    if opt["zero_stage"] == 3:
        shapes = {k: v for group in meta["param_shapes"] for k, v in group.items()}
        for d in params:
            for f in d.glob("*.pt"):
                value = safe_torch_load(f)
                if f.name != "step.pt" and torch.is_tensor(value):  # flat
                    torch.save({"param": value.view(shapes[d.name])}, f)
            if not (d / "step.pt").is_file():
                torch.save(opt["optimizer_state_dict"]["state"][0]["step"], d / "step.pt")
        if "ds_version" not in opt:
            torch.save(opt | {"ds_version": meta["ds_version"]}, opt_file)
    elif "optimizer_state_dict" not in opt:
        step = safe_torch_load(params[0] / "step.pt")
        torch.save(opt | {"optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": opt["param_groups"]}},
             opt_file)


def to_universal(ckpt_dir: Path) -> Path:
    """Convert a checkpoint into DeepSpeed's universal format (for another world size / ZeRO
    stage), once: <ckpt>/universal/. Every input file passes the weights-only check first, since
    the converter unpickles them freely."""


    out = ckpt_dir / "universal"
    if (out / "DONE").is_file():
        return out
    check_checkpoint_dir(ckpt_dir)
    tmp = ckpt_dir / f".universal.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(ckpt_dir), "--output_folder", str(tmp), "--num_extract_workers", "1",
                        "--num_merge_workers", "1"], capture_output=True, text=True)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise CheckpointError(f"{ckpt_dir}: cannot convert for a different world size ({last[:200]})")
    _complete_for_any_stage(tmp)
    (tmp / "DONE").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load(engine, ckpt_dir: Path, rank: int, universal: bool = False) -> dict[str, Any]:
    """Restore the engine and this rank's loop state and RNG; returns the loop state."""

    # After a world-size change (universal), rank 0's loop state gives step and samples seen;
    # the caller re-derives each rank's data position from the samples seen.
    loop_file = ckpt_dir / f"loop_rank{0 if universal else rank}.json"
    if not loop_file.is_file():
        raise CheckpointError(f"{ckpt_dir}: no loop state for rank {rank} (saved with fewer ranks?)")
    state = read_json(loop_file)
    check_checkpoint_dir(ckpt_dir)
    make_engine_loads_safe(engine, own_universal=universal)
    load_dir, tag = (ckpt_dir, "universal") if universal else (ckpt_dir.parent, ckpt_dir.name)
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed could not load this checkpoint")
    rng = ckpt_dir / f"rng_rank{rank}.safetensors"
    if rng.is_file() and not universal:
        set_rng_state(read_safetensors(rng))
    return state


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG states: "cpu", and "cuda" (its current GPU's) where the rank uses CUDA."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what rng_state() saved (a "cuda" state only where this rank has a GPU)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint; CheckpointError naming it if it does not parse."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (no pickle); CheckpointError naming it if it is not one."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def read_weights(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], Path]:
    """Config and consolidated weights from a run dir, a checkpoint dir or an export dir.

    Reads only JSON and safetensors: nothing is unpickled.
    """
    p = Path(path)
    if (p / "checkpoints").is_dir() or (p / "config.json").is_file() and not (p / "model.safetensors").is_file():
        best, _ = find_latest(p)
        if best is None:
            raise CheckpointError(f"{p}: no complete checkpoint in {ckpt_root(p)}")
        p = best
    weights, cfg_file = p / "model.safetensors", p / "config.json"
    if not weights.is_file() or not cfg_file.is_file():
        raise CheckpointError(f"{p}: no model.safetensors + config.json here (not a run, checkpoint or export)")
    cfg = from_dict(read_json(cfg_file))
    return cfg, read_safetensors(weights), p


def load_model(path: str | Path, device: str = "cpu"):
    """(cfg, RCN in eval mode, the checkpoint dir) from a run, checkpoint or export directory.
    A run's checkpoint saved with another model config than the run's config.json is refused."""

    cfg, sd, where = read_weights(path)
    run_cfg = Path(path) / "config.json"
    if where != Path(path) and (diff := model_diff(run_cfg, cfg)):
        raise CheckpointError(f"{where} was saved with a different model config than {run_cfg} "
                              f"(model.{', model.'.join(diff[:4])} differ)")
    model = RCN(cfg.model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        # torch's message: a header line, then one line per mismatch; show the first mismatch.
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0])[:240]
        raise CheckpointError(f"{where}: weights do not fit the config stored beside them ({first})") from None
    return cfg, model.to(device).eval(), where
