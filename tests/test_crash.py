"""Crash consistency of checkpoints: a kill -9 at each point of a save, and a damaged file in the
newest complete checkpoint (issue 16, point 5; docs/training.md, "Crash and resume guarantees"),
for ZeRO-2 fp32 and, one kill and one damaged file each, for the pipeline layout and for ZeRO-3
with bf16 (issue 23, point 8).

Every case runs the same short training (tiny preset, ZeRO-2 fp32, 8 steps, a checkpoint every 2,
the newest 2 kept, so that pruning happens at steps 6 and 8), is interrupted or damaged, and runs
the same command again on the same RUN_DIR. Each metrics row, those written before the crash and
those of the steps run again, must equal the uninterrupted run's loss for its step exactly, and
every checkpoint complete before the crash that pruning was to keep must still be there and
intact. ZeRO-2 so that DeepSpeed writes more than one file per checkpoint (model states and each
rank's optimizer partition), and a kill can land between them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import cli_env, metrics, rcn
from test_train import TINY, ds_json, losses, torchrun

from rcn_dist.parallel import checkpoint as ckpt

slow = pytest.mark.slow

STEPS = 8
ARGS = [*TINY, "train.ckpt_every=2", "train.keep_last=2", "--steps", str(STEPS)]


def tag(step: int) -> str:
    return f"step_{step:08d}"


@pytest.fixture(scope="module")
def train(fmnist_small, tmp_path_factory):
    """train(ranks, out, fault=None, check=True, layout="zero2"): the matrix's run, on 1 rank or 2
    (torchrun). The layouts: "zero2" (ZeRO-2 fp32, the matrix's own), "pipeline" (2 ranks,
    parallel.pipeline_stages=2, the pipeline's own checkpoint files) and "zero3_bf16" (ZeRO-3
    with bf16: parameters sharded, DeepSpeed's bf16 optimizer and its fp32 master weights)."""
    d = tmp_path_factory.mktemp("crash_ds")
    configs = {"zero2": ["--deepspeed", ds_json(d, 2)], "zero3_bf16": ["--deepspeed", ds_json(d, 3, "bf16")],
               "pipeline": ["parallel.pipeline_stages=2", "parallel.micro_batches=2"]}

    def go(ranks: int, out: Path, fault: str | None = None, check: bool = True, layout: str = "zero2"):
        env = cli_env(RCN_FAULT=fault) if fault else cli_env()
        args = [*configs[layout], *ARGS, "--data", fmnist_small, "--out", out]
        if ranks == 1:
            return rcn("train", *args, env=env, check=check, timeout=300)
        return torchrun(2, *args, env=env, check=check, timeout=300)

    return go


@pytest.fixture(scope="module")
def reference(train, tmp_path_factory):
    """reference(ranks, layout="zero2"): the uninterrupted run's directory, made once per module
    on first use."""
    made: dict[tuple[int, str], Path] = {}
    base = tmp_path_factory.mktemp("crash_ref")

    def get(ranks: int, layout: str = "zero2") -> Path:
        if (ranks, layout) not in made:
            out = base / f"{layout}_ranks{ranks}"
            train(ranks, out, layout=layout)
            assert sorted(losses(out)) == list(range(1, STEPS + 1))
            assert complete(out) == [tag(6), tag(8)]
            made[ranks, layout] = out
        return made[ranks, layout]

    return get


def complete(run_dir: Path) -> list[str]:
    """The tags of the complete checkpoints in a run directory."""
    return sorted(d.name for d in ckpt.ckpt_root(run_dir).glob("step_*") if (d / ckpt.COMPLETE).is_file())


def assert_intact(run_dir: Path, tags: list[str]) -> None:
    """Exactly these complete checkpoints, each with every file as saved and its weights readable."""
    assert complete(run_dir) == tags
    for t in tags:
        d = ckpt.ckpt_root(run_dir) / t
        assert ckpt.damage(d) is None, (d, ckpt.damage(d))
        ckpt.load_model(d)


def assert_losses_equal(run_dir: Path, ref: Path) -> None:
    """Every row (before the crash and after the resume) has the uninterrupted run's loss."""
    want = losses(ref)
    rows = metrics(run_dir)
    assert {r["step"] for r in rows} == set(want) == set(range(1, STEPS + 1))
    assert [(r["step"], r["loss"]) for r in rows if r["loss"] != want[r["step"]]] == []


def resumed_from(stdout: str) -> str:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("resumed from ")]
    return Path(line.split()[2]).name


# (ranks, RCN_FAULT, complete checkpoints right after the kill, `latest` then, the one resumed from,
#  layout)
KILLS = {
    "inside DeepSpeed's save": (1, "ds_save:4", [tag(2)], tag(2), tag(2), "zero2"),
    "between COMPLETE and latest": (1, "complete:4", [tag(2), tag(4)], tag(2), tag(4), "zero2"),
    "while pruning": (1, "prune:6", [tag(4), tag(6)], tag(6), tag(6), "zero2"),
    "rank 1 of 2 inside DeepSpeed's save": (2, "ds_save:4@1", [tag(2)], tag(2), tag(2), "zero2"),
    # The pipeline: the decoder rank killed after its stage's files (model_stage1, optim_stage1),
    # before its loop state; the encoder rank waits at the weights' barrier and is torn down.
    "pipeline: the decoder rank after its stage files": (2, "checkpoint:4@1", [tag(2)], tag(2), tag(2),
                                                         "pipeline"),
    "pipeline: between COMPLETE and latest": (2, "complete:4", [tag(2), tag(4)], tag(2), tag(4), "pipeline"),
    # ZeRO-3 bf16: rank 1 inside DeepSpeed's save, its parameter and optimizer shards half written.
    "ZeRO-3 bf16: rank 1 inside DeepSpeed's save": (2, "ds_save:4@1", [tag(2)], tag(2), tag(2), "zero3_bf16"),
}


@slow
@pytest.mark.parametrize("case", list(KILLS))
def test_kill9_then_resume_matches_an_uninterrupted_run(train, reference, tmp_path, case):
    ranks, fault, after_kill, latest, resume_tag, layout = KILLS[case]
    ref = reference(ranks, layout)
    out = tmp_path / "run"
    p = train(ranks, out, fault=fault, check=False, layout=layout)
    if ranks == 1:
        assert p.returncode == -9, p.stderr[-3000:]
    else:  # torchrun names the killed rank's signal and exits 1 itself
        assert p.returncode == 1 and "Signal 9 (SIGKILL)" in p.stderr, p.stderr[-3000:]
    assert_intact(out, after_kill)  # nothing already saved is lost
    assert (ckpt.ckpt_root(out) / "latest").read_text() == latest
    p = train(ranks, out, layout=layout)
    assert resumed_from(p.stdout) == resume_tag, p.stdout
    assert " is damaged " not in p.stdout
    assert_losses_equal(out, ref)
    assert_intact(out, [tag(6), tag(8)])
    assert (ckpt.ckpt_root(out) / "latest").read_text() == tag(8)
    assert sorted(d.name for d in ckpt.ckpt_root(out).glob("step_*")) == [tag(6), tag(8)]  # no leftovers


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_a_byte(f: Path) -> None:
    """Same size, one byte changed (in a .pt: inside tensor data, which unpickles as well as before)."""
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x10
    f.write_bytes(bytes(b))


# (ranks, file of the newest checkpoint, damage, layout)
DAMAGE = {
    "truncated model.safetensors": (1, "model.safetensors", truncate, "zero2"),
    "one byte changed in loop_rank0.json": (1, "loop_rank0.json", flip_a_byte, "zero2"),
    "one byte changed in rank 1's ZeRO optimizer states": (2, "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                                            flip_a_byte, "zero2"),
    "pipeline: one byte changed in the decoder stage's optimizer state": (2, "optim_stage1.pt", flip_a_byte,
                                                                           "pipeline"),
    "ZeRO-3 bf16: truncated rank 1's parameter shard": (2, "zero_pp_rank_1_mp_rank_00_model_states.pt",
                                                        truncate, "zero3_bf16"),
}


@slow
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(train, reference, tmp_path, case):
    """The newest checkpoint of a finished run is damaged; the same command again resumes from
    the previous one, says so in one line (checkpoint and file), keeps the damaged one aside and
    trains the last steps again with the uninterrupted run's losses (every rank picks the same)."""
    ranks, name, hurt, layout = DAMAGE[case]
    ref = reference(ranks, layout)
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    root = ckpt.ckpt_root(out)
    assert (root / tag(8) / name).is_file(), sorted(f.name for f in (root / tag(8)).iterdir())
    hurt(root / tag(8) / name)
    p = train(ranks, out, layout=layout)
    lines = [ln for ln in p.stdout.splitlines() if " is damaged " in ln]
    assert len(lines) == 1, p.stdout
    assert str(root / tag(8)) in lines[0] and f"({name}: " in lines[0], lines[0]
    assert resumed_from(p.stdout) == tag(6)
    assert_losses_equal(out, ref)
    assert [r["step"] for r in metrics(out)][STEPS:] == [7, 8]  # the last two steps ran again
    aside = root / f"damaged_{tag(8)}"
    assert ckpt.damage(aside) is not None and (aside / name).is_file()  # kept as it was, not deleted
    assert_intact(out, [tag(6), tag(8)])


@slow
def test_no_intact_checkpoint_left_is_one_error_line(train, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference(1), out)
    root = ckpt.ckpt_root(out)
    truncate(root / tag(8) / "model.safetensors")
    flip_a_byte(root / tag(6) / "mp_rank_00_model_states.pt")
    rows = len(metrics(out))
    p = train(1, out, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("rcn: error:")]
    assert len(errors) == 1 and "no intact checkpoint" in errors[0], p.stderr[-3000:]
    assert f"{tag(8)}: model.safetensors: " in errors[0] and f"{tag(6)}: mp_rank_00_model_states.pt: " in errors[0]
    assert complete(out) == [tag(6), tag(8)] and len(metrics(out)) == rows  # nothing moved, nothing ran
