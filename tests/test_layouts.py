"""Layouts and precisions: what carries over, and what stays exact, when the rank layout, the ZeRO
stage, the precision or the loader changes.

- A resume on another world size (1 -> 2, 2 -> 1) or ZeRO stage (3 -> 1, 2 -> 3) goes through
  DeepSpeed's universal checkpoint (rcn_dist/parallel/deepspeed_layout.py): the weights and the Adam state the
  resumed engine holds equal the saved ones, tensor by tensor. The saved side is read here from
  DeepSpeed's own files (`saved_state`), the loaded side is what the engine dumps right after its
  load (RCN_DUMP_LOADED_STATE, a test hook in parallel/deepspeed_layout.py).
- The default configs/ds.json (ZeRO-2 + bf16) on 2 ranks against fp32; a bf16 resume is exact.
- An exact 2-rank resume with 2 loader workers per rank.
- `rcn eval` counts every image once on an uneven split (1,001 test images on 2 ranks).
- Every shipped DeepSpeed JSON passes the project's config path and DeepSpeed's validation, and
  builds an engine where the CPU can (fp16 cannot: one error line).
- mpirun inside a live 2-node allocation of the local Slurm.

Multi-process runs use the tiny preset for a few steps; runs that several tests compare with are
module-scoped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PY, REPO, cli_env, metrics, rcn, run
from safetensors.torch import load_file
from test_train import TINY, _one_error_line, ds_json, losses, torchrun

from rcn_dist.parallel.safety import safe_torch_load

slow = pytest.mark.slow

WHOLE = [*TINY, "train.batch_size=512"]
"""One batch is the whole training set (512 images): a step's loss and gradient do not depend on
how the ranks split it, so runs on 1 and 2 ranks can be compared step by step."""


# ---------------------------------------------------------------- helpers
def train(nproc: int, *args, **kw) -> subprocess.CompletedProcess:
    """`rcn train` on one process, or launch/train.py under torchrun on `nproc`."""
    return rcn("train", *args, **kw) if nproc == 1 else torchrun(nproc, *args, **kw)


def assert_stopped(p: subprocess.CompletedProcess) -> None:
    """The torchrun ranks stopped on their signal after a checkpoint: exit 3 (torchrun reports a
    child's exit code in its summary and exits 1 itself)."""
    assert p.returncode == 1 and "exitcode  : 3" in p.stderr, p.stderr[-3000:]


def branch(src: Path, step: int, dst: Path) -> Path:
    """A new run directory holding only checkpoint `step` of run `src` (and the run's config):
    resuming it continues from that step and leaves `src` as it was."""
    tag = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)
    (dst / "checkpoints" / "latest").write_text(tag)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def resume_dumping(nproc: int, run_dir: Path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    """Resume run_dir; return the process and the state its engine held right after the load."""
    dump = run_dir.parent / f"{run_dir.name}-loaded.safetensors"
    p = train(nproc, *args, "--out", run_dir, env=cli_env(RCN_DUMP_LOADED_STATE=str(dump)))
    return p, load_file(str(dump))


def saved_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights, Adam moments, step and LR of a ZeRO 1-3 checkpoint, consolidated from
    DeepSpeed's own files (one parameter group, as rcn_dist builds it), in the layout of the
    backend's dump: "fp32/NAME", "exp_avg/NAME", "exp_avg_sq/NAME", "step", "lr".

    ZeRO 1-2: each rank holds a contiguous slice of one flat vector (the parameters in
    param_shapes order, padded at the end). ZeRO-3: each parameter is split on its own into
    ceil(numel / ranks) pieces, rank r holding piece r of every parameter, in order."""
    optim = sorted(ckpt_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(f.name.split("_")[3]))
    model = ckpt_dir / "mp_rank_00_model_states.pt"
    meta = safe_torch_load(model if model.is_file() else ckpt_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (shapes,) = meta["param_shapes"]
    parts: dict[str, list[torch.Tensor]] = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
    steps: set[float] = set()
    for f in optim:
        osd = safe_torch_load(f)["optimizer_state_dict"]
        zero3 = "fp32_flat_groups" in osd
        state = osd["optimizer_state_dict" if zero3 else "base_optimizer_state"]["state"]
        parts["fp32"].append(torch.cat(osd["fp32_flat_groups" if zero3 else "single_partition_of_fp32_groups"]))
        for k in ("exp_avg", "exp_avg_sq"):
            parts[k].append(torch.cat([state[i][k] for i in sorted(state)]))
        steps |= {float(s["step"]) for s in state.values()}
    out = {}
    for kind, per_rank in parts.items():
        offset, flat = 0, torch.cat(per_rank)
        for name, shape in shapes.items():
            n = math.prod(shape)
            if zero3:
                piece = math.ceil(n / len(per_rank))
                t = torch.cat([r[offset:offset + piece] for r in per_rank])[:n]
                offset += piece
            else:
                t, offset = flat[offset:offset + n], offset + n
            out[f"{kind}/{name.removeprefix('rcn.')}"] = t.view(shape)
    out["step"] = torch.tensor(sorted(steps))
    out["lr"] = torch.tensor(meta["lr_scheduler"]["_last_lr"][0], dtype=torch.float64)
    return out


def assert_state_carried_over(ckpt_dir: Path, loaded: dict[str, torch.Tensor], step: int) -> None:
    saved = saved_state(ckpt_dir)
    weights = load_file(str(ckpt_dir / "model.safetensors"))
    # The reading of DeepSpeed's files above is right: its weights are model.safetensors' (fp32).
    assert len(weights) == sum(k.startswith("fp32/") for k in saved)
    assert all(torch.equal(saved[f"fp32/{k}"], v) for k, v in weights.items())
    # Not vacuous: the checkpoint's step, and moments that training filled in.
    assert saved["step"].tolist() == [step]
    assert all(saved[f"exp_avg_sq/{k}"].any() for k in weights)
    assert sorted(loaded) == sorted(saved)
    bad = [k for k in saved if not torch.equal(loaded[k], saved[k])]
    assert not bad, f"{len(bad)} of {len(saved)} differ after the load, e.g. {bad[:4]}"


def assert_continues(want: Path, got: Path, steps: range, rel: float) -> None:
    """The resumed run's rows for `steps` against an uninterrupted run's: the same LR, the loss
    within `rel` (another reduction order, nothing more)."""
    a = {r["step"]: r for r in metrics(want)}
    b = {r["step"]: r for r in metrics(got)}
    for s in steps:
        assert b[s]["lr"] == a[s]["lr"], (s, a[s], b[s])
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=rel), (s, a[s], b[s])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- a. resume on another layout
@pytest.fixture(scope="module")
def one_rank(fmnist_small, tmp_path_factory) -> Path:
    """1 rank, ZeRO-2, fp32, whole-set batches: 5 steps straight, checkpoints at 3 and 5."""
    out = tmp_path_factory.mktemp("one_rank") / "run"
    rcn("train", "--deepspeed", ds_json(out.parent, 2), *WHOLE, "train.ckpt_every=3", "--data", fmnist_small,
        "--out", out, "--steps", "5")
    return out


@slow
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_two_ranks_from_one(one_rank, fmnist_small, tmp_path, stage):
    """1 rank (ZeRO-2) -> 2 ranks with ZeRO-2, and with ZeRO-3 (whose engine reads the universal
    checkpoint its own way): the weights, Adam moments, step and LR the 2-rank engine holds are
    the saved ones, and steps 4 and 5 give the 1-rank run's losses (rel 1e-5: measured <1e-7)."""
    run_dir = branch(one_rank, 3, tmp_path / "run")
    p, loaded = resume_dumping(2, run_dir, "--deepspeed", ds_json(tmp_path, stage), *WHOLE, "train.ckpt_every=3",
                               "--data", fmnist_small, "--steps", "5")
    assert "saved by 1 rank(s) with ZeRO 2; converting" in p.stdout and "(step 3)" in p.stdout, p.stdout
    assert_state_carried_over(run_dir / "checkpoints" / "step_00000003", loaded, step=3)
    assert sorted(losses(run_dir)) == [4, 5]
    assert_continues(one_rank, run_dir, range(4, 6), rel=1e-5)


@slow
def test_resume_on_one_rank_from_two(fmnist_small, tmp_path):
    """2 ranks ZeRO-2, stopped by SIGTERM after step 3, then 1 rank to step 5: the 1-rank engine
    holds the saved weights and Adam state, and steps 4-5 give the losses (rel 1e-5; measured
    <1e-7) and learning rates of 5 steps straight on 2 ranks. ZeRO 0 is refused up front."""
    z2 = ds_json(tmp_path, 2)
    common = [*WHOLE, "--data", fmnist_small, "--steps", "5"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    torchrun(2, "--deepspeed", z2, *common, "--out", straight)
    p = torchrun(2, "--deepspeed", z2, *common, "--out", out, env=cli_env(RCN_FAULT="step:2:SIGTERM"), check=False)
    assert_stopped(p)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    line = _one_error_line(rcn("train", *common, "--out", out, check=False))
    assert "saved by 2 rank(s) with ZeRO 2" in line and "not 0" in line, line
    p, loaded = resume_dumping(1, out, "--deepspeed", z2, *common)
    assert "resumed from" in p.stdout and "(step 3)" in p.stdout, p.stdout
    assert_state_carried_over(out / "checkpoints" / "step_00000003", loaded, step=3)
    want, got = metrics(straight), metrics(out)
    assert [r["step"] for r in got] == list(range(1, 6))
    assert [r["loss"] for r in got[:3]] == [r["loss"] for r in want[:3]]  # the same 2-rank run
    assert_continues(straight, out, range(4, 6), rel=1e-5)


@slow
def test_resume_zero3_checkpoint_with_zero1(fmnist_small, tmp_path):
    """2 ranks: a ZeRO-3 checkpoint resumed with ZeRO-1 (the README's example). The ZeRO-1 engine
    holds the saved weights and Adam state; the data order is the same (same world size), so
    steps 4-5 give the ZeRO-3 run's losses (rel 1e-6 for another reduction order; measured equal)."""
    common = [*TINY, "train.ckpt_every=3", "--data", fmnist_small, "--steps", "5"]
    straight = tmp_path / "straight"
    torchrun(2, "--deepspeed", ds_json(tmp_path, 3), *common, "--out", straight)
    run_dir = branch(straight, 3, tmp_path / "run")
    p, loaded = resume_dumping(2, run_dir, "--deepspeed", ds_json(tmp_path, 1), *common)
    assert "saved by 2 rank(s) with ZeRO 3; converting" in p.stdout and "(step 3)" in p.stdout, p.stdout
    assert_state_carried_over(run_dir / "checkpoints" / "step_00000003", loaded, step=3)
    assert_continues(straight, run_dir, range(4, 6), rel=1e-6)


# ---------------------------------------------------------------- b. the default bf16 config
BF16_STEPS = ["--steps", "6"]


@pytest.fixture(scope="module")
def bf16_run(fmnist_small, tmp_path_factory) -> Path:
    """The default configs/ds.json (ZeRO-2 + bf16) on 2 ranks, 6 steps straight."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    torchrun(2, "--deepspeed", REPO / "configs" / "ds.json", *TINY, "--data", fmnist_small, *BF16_STEPS, "--out", out)
    return out


@slow
def test_default_ds_json_on_two_ranks_trains_like_fp32(bf16_run, fmnist_small, tmp_path):
    """configs/ds.json against configs/ds_fp32.json (the same ZeRO-2 settings in fp32) on 2 ranks:
    each step's loss and the final test ELBO within 1.5%. Measured with seeds 0-3 (this run is
    seed 0): at most 0.45% on a step's loss and 0.32% on the test ELBO. bf16 keeps 8 significant
    bits, so the loss terms (~540 nats per image) carry ~0.4% rounding; 1.5% is ~3x the largest
    difference seen (the fp32 loss itself moves by 1-14% from one step to the next here)."""
    fp32 = tmp_path / "fp32"
    torchrun(2, "--deepspeed", REPO / "configs" / "ds_fp32.json", *TINY, "--data", fmnist_small, *BF16_STEPS,
             "--out", fp32)
    for run_dir, precision in ((bf16_run, "bf16"), (fp32, "fp32")):
        saved = json.loads((run_dir / "config.json").read_text())
        assert (saved["train"]["precision"], saved["parallel"]["zero_stage"]) == (precision, 2)
    a, b = losses(bf16_run), losses(fp32)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in b:
        assert a[s] == pytest.approx(b[s], rel=1.5e-2), (s, a, b)
    (ea,), (eb,) = metrics(bf16_run, "eval"), metrics(fp32, "eval")
    assert ea["test_elbo"] == pytest.approx(eb["test_elbo"], rel=1.5e-2) and ea["test_n"] == eb["test_n"] == 512
    assert a != b  # the bf16 run did compute in bf16


@slow
def test_bf16_resume_is_exact(bf16_run, fmnist_small, tmp_path):
    """configs/ds.json on 2 ranks, stopped by SIGTERM after step 3 and resumed: every step's loss,
    the final test figures and the final weights equal the uninterrupted bf16 run's, bit for bit
    (the fp32 master weights and Adam state come back from the ZeRO shards)."""
    out = tmp_path / "run"
    args = ["--deepspeed", REPO / "configs" / "ds.json", *TINY, "--data", fmnist_small, *BF16_STEPS, "--out", out]
    assert_stopped(torchrun(2, *args, env=cli_env(RCN_FAULT="step:2:SIGTERM"), check=False))
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    assert "resumed from" in torchrun(2, *args).stdout
    assert losses(out) == losses(bf16_run) and sorted(losses(out)) == list(range(1, 7))
    (ea,), (eb,) = metrics(out, "eval"), metrics(bf16_run, "eval")
    assert {k: v for k, v in ea.items() if k.startswith("test_")} == {k: v for k, v in eb.items() if k.startswith("test_")}
    assert_same_weights(out, bf16_run)


# ---------------------------------------------------------------- c. loader workers
@slow
def test_two_rank_resume_with_two_loader_workers_is_exact(fmnist_small, tmp_path):
    """2 ranks x 2 DataLoader workers (data.num_workers=2), batch 64: an epoch is 8 steps (each
    rank's 4 slots of 2 shards, 4 batches of 32 per worker). Stopped after step 5 (an odd batch:
    the workers' roles rotate on resume) and resumed to step 10 (across the epoch boundary): every
    loss and the final weights equal an uninterrupted run's."""
    common = [*TINY, "train.batch_size=64", "data.num_workers=2", "--data", fmnist_small, "--steps", "10"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(2, *common, "--out", straight)
    assert_stopped(torchrun(2, *common, "--out", split, env=cli_env(RCN_FAULT="step:4:SIGTERM"), check=False))
    for rank in (0, 1):
        loader = json.loads((split / "checkpoints" / "step_00000005" / f"loop_rank{rank}.json").read_text())["loader"]
        assert (loader["num_workers"], loader["epoch"], loader["batch"], loader["batches_per_epoch"]) == (2, 0, 5, 8)
    assert "resumed from" in torchrun(2, *common, "--out", split).stdout
    a, b = losses(straight), losses(split)
    assert sorted(b) == list(range(1, 11)) and a == b
    assert_same_weights(split, straight)


# ---------------------------------------------------------------- d. eval on an uneven split
@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """1,001 training and 1,001 test images of the real Fashion-MNIST in shards of 64: 16 test
    shards, the last of 41. On 2 ranks one reads 8 shards (512 images, 32 batches of 16), the other
    7 (489 images: 31 batches, the last of 9, then one of padding only)."""
    out = tmp_path_factory.mktemp("uneven") / "fm1001"
    rcn("prepare", "--dataset", "fashion-mnist", "--out", out, "--limit", "1001", "--shard-size", "64")
    return out


def test_eval_stream_covers_an_uneven_split_once(uneven):
    from rcn_dist.data.loader import EvalStream

    ranks = [list(EvalStream(uneven, 16, r, 2)) for r in range(2)]
    assert [len(r) for r in ranks] == [32, 32]  # as many batches on each rank: the all-reduces pair up
    seen = [torch.cat([b["index"][b["mask"]] for b in r]) for r in ranks]
    assert [len(s) for s in seen] == [512, 489]
    assert sorted(torch.cat(seen).tolist()) == list(range(1001))
    assert not ranks[1][-1]["mask"].any() and (ranks[1][-1]["index"] == -1).all()


@slow
def test_eval_on_two_ranks_counts_an_uneven_split_once(uneven, tmp_path):
    """`rcn eval` of the test ELBO/error and the IW bound on 1,001 test images: on 2 ranks every
    image counts once (test_n = iw_n = 1,001) and every figure equals the single-rank one (rel
    1e-9: the same batches, summed in float64 in another order)."""
    run_dir = tmp_path / "run"
    rcn("train", "--preset", "tiny", "--data", uneven, "--out", run_dir, "--steps", "2", "train.eval_every=0")
    parts = ["--data", uneven, "--parts", "test,iw", "--iw", "2", "eval.iw_examples=0"]
    one, two = tmp_path / "eval1.json", tmp_path / "eval2.json"
    rcn("eval", "--run", run_dir, *parts, "--out", one)
    run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "rcn_dist.cli", "eval",
         "--run-dir", run_dir, *parts, "--out", two], env=cli_env())
    a, b = (json.loads(p.read_text()) for p in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    a, b = a["metrics"], b["metrics"]
    assert a["test_n"] == b["test_n"] == a["iw_n"] == b["iw_n"] == 1001
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), (k, a[k], b[k])


# ---------------------------------------------------------------- e. the shipped DeepSpeed JSONs
SHIPPED = {"ds.json": ("bf16", 2), "ds_zero3.json": ("bf16", 3), "ds_fp32.json": ("fp32", 2),
           "ds_fp16.json": ("fp16", 2)}
"""Every DeepSpeed JSON in configs/ and what the README says it is: (precision, ZeRO stage)."""
FP16_ON_CPU = "train.precision=fp16 needs a GPU (fp16 is not supported on CPU); use bf16 or fp32"


def test_every_shipped_deepspeed_json_is_listed():
    assert sorted(p.name for p in (REPO / "configs").glob("ds*.json")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_deepspeed_json_is_valid(name):
    """The project's config path takes the JSON (load_ds_json, resolve_engine_settings with the
    tiny preset, build_ds_config) and DeepSpeed's own config class accepts what it builds (a
    misspelt key inside zero_optimization, bf16 or fp16 is refused there). fp16 is refused on CPU
    with the project's line; its JSON is checked as a GPU rank would build it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from rcn_dist.config import ConfigError, preset
    from rcn_dist.parallel.engine import build_ds_config, load_ds_json, resolve_engine_settings

    precision, stage = SHIPPED[name]
    ds = load_ds_json(REPO / "configs" / name)
    device = "cpu"
    if precision == "fp16":
        with pytest.raises(ConfigError) as e:
            resolve_engine_settings(preset("tiny"), ds, 1, "cpu")
        assert str(e.value) == FP16_ON_CPU
        device = "cuda:0"
    cfg = resolve_engine_settings(preset("tiny"), ds, 1, device)
    assert (cfg.train.precision, cfg.parallel.zero_stage, cfg.train.micro_batch) == (precision, stage, 16)
    c = DeepSpeedConfig(build_ds_config(cfg, ds))
    assert (c.zero_optimization_stage, c.bfloat16_config.enabled, c.float16_config.enabled) == (
        stage, precision == "bf16", precision == "fp16")
    assert (c.train_batch_size, c.gradient_clipping) == (16, cfg.train.grad_clip)


@slow
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_deepspeed_json_builds_an_engine(name, fmnist_small, tmp_path):
    """One step of `rcn train --deepspeed configs/NAME` on one process; ds_fp16.json instead stops
    before start-up with exactly one line on stderr, and writes nothing."""
    precision, stage = SHIPPED[name]
    out = tmp_path / "run"
    p = rcn("train", "--deepspeed", REPO / "configs" / name, *TINY, "--data", fmnist_small, "--out", out,
            "--steps", "1", check=precision != "fp16")
    if precision == "fp16":
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"rcn: error: {FP16_ON_CPU}"], p.stderr
        assert not out.exists()
        return
    assert f"ZeRO {stage}, {precision}" in p.stdout, p.stdout
    saved = json.loads((out / "config.json").read_text())
    assert (saved["train"]["precision"], saved["parallel"]["zero_stage"]) == (precision, stage)
    (row,) = metrics(out)
    assert row["step"] == 1 and math.isfinite(row["loss"])
    assert (out / "checkpoints" / "latest").read_text() == "step_00000001"


# ---------------------------------------------------------------- f. mpirun inside a 2-node allocation
MPI_JOB = """\
#!/bin/bash
# mpirun in the batch step of a 2-node allocation: Open MPI starts the rank on node2 through Slurm.
set -euo pipefail
mpi=(mpirun -np 2 $RCN_TEST_MPIRUN_ARGS)
"${mpi[@]}" bash -c 'echo "$SLURMD_NODENAME" > "$RCN_TEST_OUT/node_$OMPI_COMM_WORLD_RANK"
    "$RCN_TEST_PY" -m rcn_dist.cli env --json > "$RCN_TEST_OUT/env_$OMPI_COMM_WORLD_RANK.json"'
"${mpi[@]}" "$RCN_TEST_PY" "$RCN_TEST_REPO/launch/train.py" "$@"
"""


@slow
@pytest.mark.slurm
def test_mpirun_inside_a_two_node_allocation(slurm_env, reference_dir, fmnist_small, tmp_path):
    """`sbatch --nodes=2 --ntasks-per-node=1` on the local cluster (node1 and node2: two slurmd on
    this host), and `mpirun -np 2` in its batch script: one rank on each node; rcn detects mpirun
    (not srun, whose SLURM_PROCID is 0 for both processes here) with one rank per node, and trains
    the torchrun reference's losses."""
    from slurm_util import CPU_JOB, TRAIN, finish_job, sbatch, train_env

    steps = 4
    script, log, out = tmp_path / "job.sh", tmp_path / "job.out", tmp_path / "run"
    script.write_text(MPI_JOB)
    env = train_env(RCN_TEST_OUT=tmp_path, RCN_TEST_PY=PY, RCN_TEST_REPO=REPO,
                    RCN_TEST_MPIRUN_ARGS="--allow-run-as-root" if os.geteuid() == 0 else "")
    job = sbatch(script, *CPU_JOB, "--nodes=2", "--ntasks-per-node=1", f"--output={log}", env=env,
                 script_args=[*TRAIN, "--data", str(fmnist_small), "--out", str(out), "--steps", str(steps)])
    text = finish_job(job, log, timeout=300, env=slurm_env)
    assert [(tmp_path / f"node_{r}").read_text().strip() for r in (0, 1)] == ["node1", "node2"], text
    found = [json.loads((tmp_path / f"env_{r}.json").read_text()) for r in (0, 1)]
    assert [(e["rank"], e["world_size"], e["local_world_size"], e["launcher"]) for e in found] == [
        (0, 2, 1, "mpirun-openmpi"), (1, 2, 1, "mpirun-openmpi")], found
    assert "mpirun-openmpi: 2 rank(s)" in text and f"done: {steps} steps" in text, text
    reference = losses(reference_dir)
    assert losses(out) == {s: reference[s] for s in range(1, steps + 1)}
