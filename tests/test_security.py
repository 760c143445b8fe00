"""Untrusted checkpoints, configs, run directories and scripts (issue: untrusted files).

Every payload here would create a marker file if it ever ran; each test first shows that its
payload is live (loading it the unsafe way does create a marker) where that can be done safely
in the test process. Data files (CIFAR pickles, tar shards) are tested in test_security_data.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import PY, REPO, cli_env, metrics, rcn, run
from safetensors.torch import save_file

from rcn_dist import cli
from rcn_dist.config import ConfigError, apply_overrides, preset, resolve
from rcn_dist.errors import CheckpointError, UnsafeFileError
from rcn_dist.parallel import checkpoint as ckpt
from rcn_dist.parallel.safety import (
    check_checkpoint_dir,
    make_engine_loads_safe,
    restrict_umask,
    safe_torch_load,
)


class Payload:
    """Unpickling this calls os.system: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def evil_pt(path: Path, marker: Path) -> Path:
    """A torch checkpoint shaped like DeepSpeed's model states, with a payload inside."""
    torch.save({"module": {"w": torch.zeros(2)}, "lr_scheduler": Payload(marker), "global_steps": 1}, path)
    return path


def test_payload_is_live(tmp_path):
    marker = tmp_path / "control"
    torch.load(evil_pt(tmp_path / "c.pt", marker), weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------- checkpoints, in process
def test_safe_load_refuses_the_payload_naming_file_and_global(tmp_path):
    marker = tmp_path / "marker"
    bad = evil_pt(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeFileError, match=r"mp_rank_00_model_states\.pt: refused to unpickle.*posix\.system"):
        safe_torch_load(bad)
    assert not marker.exists()


def test_safe_load_admits_tensors_and_deepspeed_data_classes(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"scaler": LossScaler(4.0), "dyn": DynamicLossScaler(2.0**16, 1000, 1, 2, False),
                "stage": ZeroStageEnum(2), "shapes": {"w": torch.Size([3, 2])}, "w": torch.ones(3, 2)},
               tmp_path / "ok.pt")
    sd = safe_torch_load(tmp_path / "ok.pt")
    assert sd["scaler"].cur_scale == 4.0 and sd["stage"] == ZeroStageEnum(2) and sd["w"].sum() == 6


class _ByGetattr:
    """Pickles as getattr(cls, name), the way some Python versions pickle an Enum member."""

    def __init__(self, cls, name: str) -> None:
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_safe_load_admits_getattr_only_for_a_member_of_an_admitted_enum(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"stage": _ByGetattr(ZeroStageEnum, "gradients")}, tmp_path / "ok.pt")
    assert safe_torch_load(tmp_path / "ok.pt")["stage"] is ZeroStageEnum.gradients
    for name in ("__new__", "__class__", "nope"):
        torch.save({"x": _ByGetattr(ZeroStageEnum, name)}, tmp_path / "bad.pt")
        with pytest.raises(UnsafeFileError, match=r"bad\.pt: refused to unpickle"):
            safe_torch_load(tmp_path / "bad.pt")
    torch.save({"x": _ByGetattr(torch.Size, "count")}, tmp_path / "bad.pt")  # an admitted class, no enum
    with pytest.raises(UnsafeFileError, match=r"bad\.pt: refused to unpickle"):
        safe_torch_load(tmp_path / "bad.pt")


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04 not a torch zip file")
    with pytest.raises(UnsafeFileError, match=r"junk\.pt: not a readable checkpoint file"):
        check_checkpoint_dir(tmp_path)


def test_checkpoint_dir_check_covers_every_rank_file(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"optimizer_state_dict": {}}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    evil_pt(tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UnsafeFileError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        check_checkpoint_dir(tmp_path)
    (tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (tmp_path / "universal" / "zero" / "w").mkdir(parents=True)  # DeepSpeed's universal loader reads these
    evil_pt(tmp_path / "universal" / "zero" / "w" / "fp32.pt", marker)
    with pytest.raises(UnsafeFileError, match="universal/zero/w/fp32.pt"):
        check_checkpoint_dir(tmp_path)
    assert not marker.exists()


def _safe_engine(universal: bool = False) -> SimpleNamespace:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(), load_universal_checkpoint=lambda: universal)
    make_engine_loads_safe(engine)
    return engine


def test_deepspeeds_state_dict_loader_reads_through_the_safe_load(tmp_path):
    """The loader DeepSpeed's engine.load_checkpoint uses for the model states file."""
    from deepspeed.runtime.state_dict_factory import SDLoaderFactory

    marker = tmp_path / "marker"
    bad = evil_pt(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeFileError, match="mp_rank_00_model_states.pt"):  # it reads the file at once
        SDLoaderFactory.get_sd_loader([str(bad)], checkpoint_engine=_safe_engine().checkpoint_engine).load(1, 0)
    assert not marker.exists()


def test_universal_checkpoint_loading_is_refused():
    """DeepSpeed's universal-checkpoint loader calls torch.load(weights_only=False) itself."""
    with pytest.raises(UnsafeFileError, match="load_universal"):
        _safe_engine(universal=True)


def _tiny_export(d: Path) -> None:
    from rcn_dist.model import RCN

    cfg = preset("tiny")
    save_file({k: v.contiguous() for k, v in RCN(cfg.model).state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(cfg.to_json())


def test_weights_are_read_from_safetensors_and_json_only(tmp_path):
    marker = tmp_path / "marker"
    d = tmp_path / "checkpoints" / "step_00000001"
    d.mkdir(parents=True)
    _tiny_export(d)
    evil_pt(d / "mp_rank_00_model_states.pt", marker)
    (d / "COMPLETE").write_text("{}")
    (d.parent / "latest").write_text(d.name)
    cfg, model, where = ckpt.load_model(tmp_path)
    assert where == d and cfg.name == "tiny"
    evil_pt(d / "model.safetensors", marker)  # a pickle posing as the weights
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        ckpt.read_weights(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("pointer", ["../../elsewhere/step_00000001", "/tmp/step_00000001", "step_1/../../x"])
def test_latest_pointer_cannot_lead_outside_the_run(tmp_path, pointer):
    # The resume takes the newest intact step_N of the run itself; `latest` is never followed.
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "COMPLETE").write_text("{}")
    (root / "latest").write_text(pointer)
    assert ckpt.find_latest(tmp_path / "run") == (root / "step_00000002", [])


# ---------------------------------------------------------------- configs
EXPR = "__import__('os').system('touch {m}')"


def test_yaml_tags_are_refused_not_evaluated(tmp_path, capsys):
    marker = tmp_path / "marker"
    text = f"!!python/object/apply:os.system [{json.dumps('touch ' + shlex.quote(str(marker)))}]\n"
    try:  # the payload is live: PyYAML's unsafe loader runs it
        import yaml

        control = tmp_path / "control"
        yaml.unsafe_load(text.replace(str(marker), str(control)))
        assert control.exists()
    except ImportError:
        pass
    (tmp_path / "evil.yaml").write_text(text)
    rc = cli.main(["train", "--preset", "tiny", "--config", str(tmp_path / "evil.yaml"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("rcn: error:") == 1 and "unsupported format '.yaml'" in err, err
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_expressions_in_config_values_stay_strings(tmp_path, suffix):
    marker = tmp_path / "marker"
    expr = EXPR.format(m=marker)
    f = tmp_path / f"c{suffix}"

    def write(section: str, key: str) -> None:
        if suffix == ".toml":
            f.write_text(f"[{section}]\n{key} = {json.dumps(expr)}\n")
        else:
            f.write_text(json.dumps({section: {key: expr}}))

    write("train", "steps")  # an int field
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        resolve("tiny", f, [])
    write("model", "rnn")  # a string field with choices
    with pytest.raises(ConfigError, match="model.rnn"):
        resolve("tiny", f, [])
    write("data", "dir")  # a free string: kept verbatim, as a string
    assert resolve("tiny", f, []).data.dir == expr
    assert not marker.exists()


def test_expressions_in_command_line_overrides_stay_strings(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        apply_overrides(preset("tiny"), [f"train.lr={EXPR.format(m=marker)}"])
    assert not marker.exists()


@pytest.mark.parametrize("ds", [{"zero_optimization": {"stage": "EXPR"}}, {"train_batch_size": "EXPR"},
                                {"optimizer": {"type": "Adam", "params": {"lr": "EXPR"}}}])
def test_expressions_in_deepspeed_json_are_refused(tmp_path, ds):
    from rcn_dist.parallel.engine import load_ds_json, resolve_engine_settings

    marker = tmp_path / "marker"
    (tmp_path / "ds.json").write_text(json.dumps(ds).replace('"EXPR"', json.dumps(EXPR.format(m=marker))))
    try:
        with pytest.raises(ConfigError):
            resolve_engine_settings(preset("tiny"), load_ds_json(tmp_path / "ds.json"), 1, "cpu")
    finally:
        assert not marker.exists()


# ---------------------------------------------------------------- permissions
def test_restrict_umask_adds_only_other_write():
    old = os.umask(0)
    try:
        assert restrict_umask() == 0o002
        os.umask(0o077)
        assert restrict_umask() == 0o077
        os.umask(0o020)
        assert restrict_umask() == 0o022
    finally:
        os.umask(old)


# ---------------------------------------------------------------- shell scripts
SCRIPTS = sorted(p for d in ("slurm", "launch") for p in (REPO / d).glob("*") if p.suffix in (".sh", ".sbatch"))
# Unquoted expansions, word-split command substitutions and arrays, quotes kept inside variables.
QUOTING_CODES = "SC2086,SC2046,SC2048,SC2068,SC2206,SC2207,SC2089,SC2090,SC2294"


def test_shell_scripts_quote_every_expansion():
    assert shutil.which("shellcheck"), "shellcheck is not installed (launch/setup.sh --test installs it)"
    assert SCRIPTS
    p = subprocess.run(["shellcheck", "--format=gcc", f"--include={QUOTING_CODES}", *map(str, SCRIPTS)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


# `eval` in command position, or a string handed to a new shell.
EVALUATES = r"(^|[;&|({]|\bthen|\bdo|\belse)\s*eval\s|\b(ba|da|z)?sh\s+-c\b"


def test_shell_scripts_never_evaluate_strings():
    offenders = [f"{s.relative_to(REPO)}:{i}: {ln.strip()}" for s in SCRIPTS
                 for i, ln in enumerate(s.read_text().splitlines(), 1)
                 if not ln.lstrip().startswith("#") and re.search(EVALUATES, ln)]
    assert not offenders, "\n".join(offenders)


def test_numeric_settings_of_scripts_are_not_evaluated(tmp_path):
    marker = tmp_path / "marker"
    env = cli_env(RCN_SLURM_DIR=str(tmp_path / "cluster"), RCN_SLURM_PORT=f"PATH[$(touch {marker})]")
    p = subprocess.run(["bash", str(REPO / "slurm/local_cluster.sh"), "status"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode != 0 and "RCN_SLURM_PORT must be a positive integer" in p.stderr
    assert not marker.exists()


# ---------------------------------------------------------------- end to end (training processes)
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """64 training and 64 test images in 4 + 4 shards: the final evaluation stays short."""
    out = tmp_path_factory.mktemp("secdata") / "fmnist64"
    rcn("prepare", "--dataset", "fashion-mnist", "--out", out, "--limit", "64", "--shard-size", "16")
    return out


def evil_run(run_dir: Path, marker: Path, bad_name: str, ranks: int = 1, zero_stage: int = 0) -> Path:
    """A run directory whose latest complete checkpoint holds `bad_name` with the payload, saved
    (says its COMPLETE) with the layout of the run that resumes it."""
    d = run_dir / "checkpoints" / ckpt.tag_for(1)
    d.mkdir(parents=True)
    evil_pt(d / bad_name, marker)
    for r in range(ranks):
        (d / f"loop_rank{r}.json").write_text(json.dumps({"step": 1, "samples": 16, "loader": {}}))
    (d / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": ranks, "zero_stage": zero_stage}))
    (d.parent / "latest").write_text(d.name)
    return d / bad_name


def one_error_line(p: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("rcn: error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_checkpoint_with_a_payload_is_refused_on_resume(small, tmp_path):
    marker = tmp_path / "marker"
    bad = evil_run(tmp_path / "run", marker, "mp_rank_00_model_states.pt")
    p = rcn("train", "--preset", "tiny", "--data", small, "--out", tmp_path / "run", "--steps", "2",
            "train.eval_every=0", check=False, timeout=120)
    line = one_error_line(p)
    assert str(bad) in line and "refused to unpickle" in line and "posix.system" in line
    assert not marker.exists()


@pytest.mark.slow
def test_two_ranks_both_refuse_a_file_only_one_of_them_reads(small, tmp_path):
    """DeepSpeed reads rank 1's ZeRO partition on rank 1 only: rank 0 refuses too, instead of
    waiting for rank 1 in a collective. The two ranks are started side by side (as a launcher
    would, without one that stops the other rank when the first exits), so each must end alone."""
    marker = tmp_path / "marker"
    bad = evil_run(tmp_path / "run", marker, "zero_pp_rank_1_mp_rank_00_optim_states.pt", ranks=2, zero_stage=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [PY, str(REPO / "launch/train.py"), "--preset", "tiny", "--data", str(small), "--out", str(tmp_path / "run"),
           "--steps", "2", "train.eval_every=0", "parallel.zero_stage=2"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
        for r in range(2)]
    try:
        results = [(p.wait(timeout=150), p.communicate()[1]) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rc, err in results:
        errors = [ln for ln in err.splitlines() if ln.startswith("rcn: error:")]
        assert rc == 2 and len(errors) == 1 and str(bad) in errors[0], err[-3000:]
    assert not marker.exists()


STAGES = {"zero0-fp32": (0, False), "zero2-bf16": (2, True), "zero3-bf16": (3, True)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", STAGES)
def test_resume_loads_every_file_deepspeed_writes(small, tmp_path, layout):
    """The allowlist is complete for what DeepSpeed writes: 1 step, then a resume to step 2.

    The run directory's name has spaces and shell syntax in it. For ZeRO 0 the first run goes
    through slurm/train_fmnist.sh outside Slurm (one process), whose shell passes it on."""
    stage, bf16 = STAGES[layout]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}))
    out = tmp_path / "run dir $(touch pwned) `touch pwned2` ;touch pwned3"
    args = ["train", "--preset", "tiny", "--data", small, "--out", out, "train.ckpt_every=1",
            "train.eval_every=0", "--deepspeed", ds]
    if stage == 0 and (REPO / "slurm/train_fmnist.sh").is_file():
        run(["bash", str(REPO / "slurm/train_fmnist.sh")], cwd=tmp_path, timeout=180, env=cli_env(
            RCN_HOME=str(REPO), RCN_PYTHON=PY, RCN_PRESET="tiny", RCN_DATA=str(small), RCN_RUN_DIR=str(out),
            RCN_STEPS="1", RCN_DEEPSPEED=str(ds), RCN_OVERRIDES="train.ckpt_every=1 train.eval_every=0"))
    else:
        rcn(*args, "--steps", "1", cwd=tmp_path, timeout=180)
    p = rcn(*args, "--steps", "2", cwd=tmp_path, timeout=180)
    assert f"resumed from {out}/checkpoints/step_00000001 (step 1)" in p.stdout + p.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(map(torch.isfinite, torch.tensor([r["loss"] for r in rows])))
    assert not list(tmp_path.glob("pwned*")) and not list(REPO.glob("pwned*"))


@pytest.mark.slow
def test_nothing_written_is_world_writable_under_umask_000(small, tmp_path):
    out = tmp_path / "run"
    cmd = [PY, "-m", "rcn_dist.cli", "train", "--preset", "tiny", "--data", str(small), "--out", str(out),
           "--steps", "1", "train.eval_every=0", "parallel.zero_stage=3"]
    p = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180, umask=0)
    assert p.returncode == 0, p.stderr[-3000:]
    written = [out, *out.rglob("*")]
    assert len(written) > 8
    loose = [f"{oct(q.stat().st_mode & 0o777)} {q}" for q in written if q.stat().st_mode & stat.S_IWOTH]
    assert not loose, "\n".join(loose)
