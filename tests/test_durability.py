"""The durability order of a checkpoint save: every file and directory of the checkpoint is
fsynced before COMPLETE exists, COMPLETE (and checkpoints/) before `latest` names the checkpoint.

A power loss cannot be staged in a test, so the order is observed: os.fsync is wrapped to record
which path each call flushed (through /proc/self/fd) and what existed on the disk at that moment,
while checkpoint.commit runs for real (one process, no process group: its barriers are no-ops).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rcn_dist.config import preset
from rcn_dist.files import atomic_write, fsync_tree
from rcn_dist.parallel import checkpoint as ckpt


@pytest.fixture
def fsyncs(monkeypatch):
    """[(path flushed, COMPLETE existed, latest named the checkpoint)] of every os.fsync call."""
    calls: list[tuple[Path, bool, bool]] = []
    real = os.fsync
    watch: dict[str, Path] = {}

    def recording_fsync(fd):
        real(fd)  # the flush itself, then what it flushed
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        d = watch.get("dir")
        latest = watch.get("root", Path("/nonexistent")) / ckpt.LATEST
        calls.append((path, d is not None and (d / ckpt.COMPLETE).exists(),
                      latest.exists() and d is not None and latest.read_text() == d.name))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls, watch


def _write_state(d: Path) -> None:
    """What an engine writes: a file in the checkpoint and one in a sub-directory (ZeRO's zero/)."""
    torch.save({"w": torch.ones(3)}, d / "mp_rank_00_model_states.pt")
    (d / "zero").mkdir()
    (d / "zero" / "optim.pt").write_bytes(b"\0" * 64)


def test_every_file_is_on_the_disk_before_complete_and_complete_before_latest(tmp_path, fsyncs):
    calls, watch = fsyncs
    cfg = preset("tiny")
    root = ckpt.ckpt_root(tmp_path)
    watch["dir"], watch["root"] = root / ckpt.tag_for(2), root
    d = ckpt.commit(tmp_path, 2, {"step": 2}, cfg, rank=0, world_size=1, keep_last=2, write_state=_write_state,
                    weights=lambda d: {"w": torch.zeros(2)})
    assert d == watch["dir"] and json.loads((d / ckpt.COMPLETE).read_text())["step"] == 2
    assert (root / ckpt.LATEST).read_text() == d.name

    def first(path: Path) -> tuple[bool, bool]:
        """(COMPLETE existed, latest named d) at the first fsync of `path`."""
        for p, complete, latest in calls:
            if p == path.resolve():
                return complete, latest
        raise AssertionError(f"{path} was never fsynced; fsynced: {sorted({str(c[0]) for c in calls})}")

    files = [p for p in d.rglob("*") if p.is_file() and p.name != ckpt.COMPLETE]
    assert {p.name for p in files} >= {"mp_rank_00_model_states.pt", "optim.pt", "loop_rank0.json",
                                       "rng_rank0.safetensors", "model.safetensors", "config.json"}
    for p in files + [d / "zero", d]:  # the files and their directory entries, before COMPLETE
        assert first(p) == (False, False), p
    # COMPLETE's content (its temporary file, before the rename), then its name (d, once COMPLETE
    # is there) and d's name (checkpoints/) are flushed before `latest` names d.
    assert any(p.name.startswith(f".{ckpt.COMPLETE}.") and not lat for p, c, lat in calls)
    assert any(p == d.resolve() and c and not lat for p, c, lat in calls)
    assert any(p == root.resolve() and c and not lat for p, c, lat in calls)


def test_atomic_write_flushes_the_file_and_then_its_directory(tmp_path, fsyncs):
    calls, _ = fsyncs
    atomic_write(tmp_path / "x.json", "{}")
    flushed = [p for p, _, _ in calls]
    assert flushed[-1] == tmp_path.resolve() and flushed[-2].parent == tmp_path.resolve()


def test_fsync_tree_flushes_files_before_their_directories(tmp_path, fsyncs):
    calls, _ = fsyncs
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("1")
    (tmp_path / "g").write_text("2")
    fsync_tree(tmp_path)
    order = [p for p, _, _ in calls]
    t = tmp_path.resolve()
    assert order.index(t / "a" / "b" / "f") < order.index(t / "a" / "b") < order.index(t / "a") < order.index(t)
    assert order.index(t / "g") < order.index(t)


def test_fsync_tree_passes_over_a_file_gone_since_the_listing(tmp_path, fsyncs):
    """Another rank's temporary file renamed away between the listing and the open (here: a name
    that leads nowhere, as such a file's name does by then) is passed over, not an error that
    kills this rank in the middle of a save."""
    calls, _ = fsyncs
    (tmp_path / "kept").write_text("1")
    (tmp_path / ".config.json.123-ab.tmp").symlink_to(tmp_path / "renamed-away")
    fsync_tree(tmp_path)
    assert (tmp_path / "kept").resolve() in [p for p, _, _ in calls]
