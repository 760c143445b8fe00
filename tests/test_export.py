"""`rcn export`: safetensors + JSON that checkpoint.load_model loads with no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rcn

import rcn_dist
from rcn_dist.cli import main as cli_main
from rcn_dist.parallel.checkpoint import load_model


def parse_safetensors(path) -> dict:
    """Parse the file by its format (8-byte little-endian header length, JSON header, raw bytes)
    and check that the tensors tile the data section exactly: no room for anything else."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    spans = sorted(tuple(t["data_offsets"]) for t in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    return header


@pytest.mark.slow
def test_export_round_trip(fmnist_small, tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "export"
    rcn("train", "--preset", "tiny", "--data", fmnist_small, "--out", run_dir, "--steps", "4",
        "train.eval_every=0", "train.ckpt_every=2")
    rcn("export", "--run", run_dir, "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for p in out.iterdir():
        assert not p.read_bytes().startswith((b"\x80", b"PK")), f"{p.name} looks like a pickle / zip"
    header = parse_safetensors(out / "model.safetensors")
    assert {t["dtype"] for t in header.values()} == {"F32"}
    assert json.loads((out / "config.json").read_text()) == json.loads((run_dir / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "tiny preset" in card and "steps trained: 4" in card and "test_elbo" in card

    # One loader for a run and its export (what eval and sample take too).
    cfg, ref, _ = load_model(run_dir)
    _, model, where = load_model(out, device="cpu")
    assert where == out and not model.training
    assert set(header) == set(model.state_dict())
    torch.manual_seed(0)
    x = torch.rand(3, 1, 28, 28).round()
    eps = torch.randn(3, cfg.model.T, cfg.model.z_dim)
    with torch.no_grad():
        a, b = ref(x, eps), model(x, eps)
    assert torch.equal(a.canvas, b.canvas) and torch.equal(a.class_lengths, b.class_lengths)
    # The one-liner of the README's Python API: the same model from the run and from the export.
    for where_from in (run_dir, out):
        cfg2, m2 = rcn_dist.load(where_from)
        assert cfg2 == cfg and not m2.training
        with torch.no_grad():
            assert torch.equal(m2(x, eps).canvas, a.canvas)

    # An older step can be exported; a missing one is refused, naming what exists.
    assert cli_main(["export", "--run", str(run_dir), "--out", str(tmp_path / "step2"), "--step", "2"]) == 0
    assert "steps trained: 2" in (tmp_path / "step2" / "README.md").read_text()
    capsys.readouterr()
    assert cli_main(["export", "--run", str(run_dir), "--out", str(tmp_path / "x"), "--step", "3"]) == 2
    assert "no complete checkpoint at step 3 (complete: 2, 4)" in capsys.readouterr().err


def test_export_without_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code = cli_main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no complete checkpoint to export" in err
    assert not (tmp_path / "out").exists()
    code = cli_main(["export", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
