"""A third layout in one module, registered from this test file: "plain", the whole RCN with
torch.optim's Adam on one process, no DeepSpeed. It trains the tiny preset and resumes exactly (the
same losses and weights as an uninterrupted run) through `rcn train` unchanged: train.py, loop.py
and config.py name no layout, the registry (rcn_dist.parallel.layouts) finds this one by
parallel.layout=plain.

Run as a script (`python tests/test_layout_plugin.py --preset tiny ...`), this file registers the layout
and then runs `rcn train`, the way a user's own launcher module would.

The other half of the file: the checkpoint to resume is read and CRC-checked on rank 0 only, and
its name broadcast (checkpoint.agree_latest).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PY, cli_env, metrics, rcn, run
from safetensors.torch import load_file

from rcn_dist import loop, signals
from rcn_dist.config import Config, ConfigError, apply_overrides, preset
from rcn_dist.errors import CheckpointError
from rcn_dist.evaluation import caps_input, evaluate, to_device
from rcn_dist.model import RCN
from rcn_dist.model.losses import TERMS, LossModule
from rcn_dist.parallel import checkpoint as ckpt
from rcn_dist.parallel import layouts
from rcn_dist.parallel.engine import lr_lambda
from rcn_dist.parallel.env import LaunchEnv
from rcn_dist.parallel.layouts import LayoutParts, LayoutSpec, Run, register
from rcn_dist.parallel.safety import safe_torch_load

NAME = "plain"


# ---------------------------------------------------------------- the layout, all of it
def check_config(cfg: Config, launch: LaunchEnv) -> None:
    if launch.world_size != 1:
        raise ConfigError(f"parallel.layout={NAME} runs on one process, not {launch.world_size}")
    if cfg.train.precision != "fp32":
        raise ConfigError(f"parallel.layout={NAME} trains in fp32, not {cfg.train.precision}")


def check_resume(ckpt_dir: Path, cfg: Config, launch: LaunchEnv) -> None:
    if ckpt.saved_layout(ckpt_dir).get("layout") != NAME:
        raise CheckpointError(f"{ckpt_dir} was not written by the {NAME} layout")


def build(run: Run) -> LayoutParts:
    cfg, device, train_cfg = run.cfg, run.launch.device, run.cfg.train
    torch.manual_seed(train_cfg.seed)
    model = LossModule(RCN(cfg.model)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    def forward_backward(batch: dict, eps: torch.Tensor, last: bool) -> torch.Tensor:
        x, y = to_device(batch["image"], device), to_device(batch["label"], device)
        terms = model(x, y, eps, x_caps=caps_input(batch, cfg, device))
        (terms["loss"].mean() / train_cfg.grad_accum).backward()
        return torch.stack([terms[k].detach().mean() for k in TERMS]).double()

    def update() -> None:
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def save(step: int, loop_state: dict[str, Any]) -> Path:
        def write_state(d: Path) -> None:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, d / "optim.pt")

        return ckpt.commit(run.run_dir, step, loop_state, cfg, 0, 1, train_cfg.keep_last, write_state,
                           lambda d: model.rcn.state_dict(), layout={"layout": NAME})

    def load(d: Path) -> dict[str, Any]:
        model.rcn.load_state_dict(ckpt.read_safetensors(d / "model.safetensors"))
        state = safe_torch_load(d / "optim.pt")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(ckpt.read_safetensors(d / "rng_rank0.safetensors"))
        return ckpt.read_json(d / "loop_rank0.json")

    return LayoutParts(forward_backward=forward_backward, update=update, lr=lambda: scheduler.get_last_lr()[0],
                       evaluate=lambda stream, max_batches: evaluate(model, stream, cfg, device, max_batches),
                       save=save, load=load, loss_ranks=1)


register(LayoutSpec(name=NAME, build=build, check_config=check_config, check_resume=check_resume,
                    describe="torch.optim on one process (tests/test_layout_plugin.py)"))


# ---------------------------------------------------------------- the tests
TINY = ["--preset", "tiny", "train.eval_every=0", "train.ckpt_every=5", "train.batch_size=16"]


def plain(*args, **kw):
    """`rcn train` with the plain layout registered (this file as the entry point)."""
    return run([PY, __file__, *map(str, args)], **kw)


def test_a_layout_registered_from_a_test_file_trains_and_resumes_exactly(fmnist_small, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*TINY, "--data", fmnist_small, "--steps", "10", "parallel.layout=plain", "train.eval_every=10"]
    plain(*common, "--out", straight)
    p = plain(*common, "--out", split, env=cli_env(RCN_FAULT="step:4:SIGTERM"), check=False)
    assert p.returncode == 3, p.stderr[-3000:]
    assert (split / "checkpoints" / "latest").read_text() == "step_00000005"
    p = plain(*common, "--out", split)
    assert "resumed from" in p.stdout and "step_00000005" in p.stdout
    a = {r["step"]: r for r in metrics(straight)}
    b = {r["step"]: r for r in metrics(split)}
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for s in range(6, 11):  # bit-identical
        assert [b[s][k] for k in (*TERMS, "lr")] == [a[s][k] for k in (*TERMS, "lr")], s
    wa = load_file(str(straight / "checkpoints" / "step_00000010" / "model.safetensors"))
    wb = load_file(str(split / "checkpoints" / "step_00000010" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics(straight, "eval")[-1]["test_n"] == 512  # evaluate ran through the layout
    done = json.loads((split / "checkpoints" / "step_00000010" / "COMPLETE").read_text())
    assert done["layout"] == NAME
    # The deepspeed layout refuses the plain checkpoint, in one line naming the layout to use.
    p = rcn("train", *TINY, "--data", fmnist_small, "--steps", "12", "--out", split, check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("rcn: error:")]
    assert p.returncode != 0 and len(lines) == 1 and "parallel.layout=plain" in lines[0], p.stderr[-3000:]


def test_an_unknown_layout_is_refused_naming_the_registered_ones(fmnist_small, tmp_path):
    p = rcn("train", *TINY, "--data", fmnist_small, "--out", tmp_path / "r", "parallel.layout=nosuch",
            check=False, timeout=120)
    assert p.returncode == 2 and "no layout 'nosuch'" in p.stderr and "deepspeed" in p.stderr, p.stderr
    p = rcn("train", *TINY, "--data", fmnist_small, "--out", tmp_path / "r", "parallel.pipeline_stages=3",
            check=False, timeout=120)
    assert p.returncode == 2 and "parallel.pipeline_stages: must be 1 or 2" in p.stderr, p.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_the_registry_chooses_by_name_or_by_pipeline_stages():
    tiny = preset("tiny")
    assert layouts.choose(tiny).name == "deepspeed"
    assert layouts.choose(apply_overrides(tiny, ["parallel.pipeline_stages=2"])).name == "pipeline"
    assert layouts.choose(apply_overrides(tiny, ["parallel.layout=plain"])).name == NAME
    with pytest.raises(ConfigError, match="the pipeline layout runs 2 stage"):
        layouts.choose(apply_overrides(tiny, ["parallel.layout=pipeline"]))
    with pytest.raises(ValueError, match="already parallel.layout=auto's choice"):
        layouts.register(LayoutSpec(name="another", build=build, auto=True))


# ---------------------------------------------------------------- the checkpoint check, once

def _agree_worker(rank: int, rdv: str, run_dir: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    crcs = []
    real = ckpt._crc32
    ckpt._crc32 = lambda path: crcs.append(str(path)) or real(path)
    try:
        latest, notes = ckpt.agree_latest(run_dir, rank)
    finally:
        ckpt._crc32 = real
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"latest": None if latest is None else str(latest), "notes": notes, "crcs": len(crcs)}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _checkpoint(run_dir: Path, step: int, damaged: bool = False) -> Path:
    d = ckpt.ckpt_root(run_dir) / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    (d / ckpt.COMPLETE).write_text(json.dumps({"step": step, "world_size": 2, "zero_stage": 0,
                                               "files": ckpt._manifest(d)}))
    if damaged:
        (d / "model.safetensors").write_bytes(os.urandom(4096))
    return d


def test_the_checkpoint_to_resume_is_checked_on_rank_0_only(tmp_path):
    """Rank 0 reads and CRCs the candidates (a damaged newest one, then the intact one before
    it); rank 1 reads none and gets the same checkpoint and notes."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    good = _checkpoint(run_dir, 5)
    _checkpoint(run_dir, 10, damaged=True)
    torch.multiprocessing.spawn(_agree_worker, args=(str(tmp_path / "rdv"), str(run_dir), str(out)), nprocs=2)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["latest"] == r1["latest"] == str(good)
    assert r0["notes"] == r1["notes"] and "step_00000010 is damaged" in r0["notes"][0]
    assert r0["crcs"] >= 2 and r1["crcs"] == 0
    # The run's set-up asks rank 0 (agree_latest), not every rank (find_latest).

    source = inspect.getsource(loop.setup_run)
    assert "ckpt.agree_latest(" in source and "find_latest" not in source


def test_every_rank_raises_when_rank_0_finds_every_checkpoint_damaged(tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 5, damaged=True)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        ckpt.agree_latest(run_dir, 0)  # no process group: rank 0's own answer


if __name__ == "__main__":
    signals.catch()
    from rcn_dist.cli import run_main
    from rcn_dist.parallel.teardown import exit_process
    from rcn_dist.train import main

    exit_process(run_main(main, sys.argv[1:]))
