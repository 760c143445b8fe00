"""`rcn report`: one page per run and a comparison page, from a run directory's files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from rcn_dist import cli
from rcn_dist.config import apply_overrides, preset
from rcn_dist.report import compare_report, run_report


def fake_run(d: Path, lr: float = 3e-3, with_eval: bool = True, seed: int = 0, error: float = 0.4) -> Path:
    """A run directory as `rcn train`, `rcn eval` and `rcn sample` leave it (numbers made up)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(apply_overrides(preset("tiny"), [f"train.lr={lr}", f"train.seed={seed}"]).to_json())
    rows = [{"step": s, "loss": 600 - s, "margin": 0.8 - s / 100, "recon": 540 - s, "kl": 1 + s / 10,
             "elbo": 541 - s, "lr": lr, "img_per_s": 300.0, "samples": 16 * s} for s in range(1, 11)]
    rows += [{"kind": "eval", "step": s, "test_elbo": 545.0 - s, "test_recon": 543.0 - s, "test_kl": 2.0,
              "test_margin": 0.7, "test_error": 0.5 - s / 100, "test_n": 512, "full": True} for s in (5, 10)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')
    if with_eval:
        (d / "eval.json").write_text(json.dumps({
            "checkpoint": str(d / "checkpoints/step_00000010"), "step": 10, "world_size": 1, "reduced": True,
            "eval": {"iw_samples": 10}, "metrics": {
                "test_error": error, "test_elbo": 535.0, "iw_nll": 533.25, "frechet": 12.5, "memorised": False,
                "info_rate_steps": [1.5, 0.5], "info_active_units_steps": [3, 1], "info_active_units": 4,
                "window_area_steps": [0.75, 0.25], "window_x_steps": [13.5, 10.0], "window_y_steps": [12.0, 8.0],
                "class_names": ["coat", "bag"], "class_shares": [0.875, 0.125], "class_shares_test": [0.5, 0.5],
                "class_kl": 0.41, "class_min_share": 0.125, "class_rarest": "bag", "copy_zu_cells": [-1.5, None],
                "c2st_accuracy": 0.625}}))
        (d / "samples").mkdir()
        Image.new("RGB", (40, 40), (200, 0, 0)).save(d / "samples" / "samples.png")
    return d


def links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_run_report_holds_config_curves_numbers_and_pictures(tmp_path):
    run_dir = fake_run(tmp_path / "a")
    path = run_report(run_dir)
    md = path.read_text()
    assert path == run_dir / "report.md"
    assert "| test_elbo | 535 |" in md and "| iw_nll | 533.2 |" in md and "**reduced**" in md
    assert "| 10 | 0.4 | 535 | 533 | 2 | 0.7 |" in md  # the loop's test rows
    # eval.json's lists: a table per step, one per class with its picture, one per data-copying cell;
    # the numbers table holds only the numbers.
    assert "| 1 | 1.5 | 3 | 0.75 | 13.5 | 12 |" in md and "| 2 | 0.5 | 1 | 0.25 | 10 | 8 |" in md
    assert "| bag | 0.125 | 0.5 |" in md and "| class_rarest | bag |" in md and "| c2st_accuracy | 0.625 |" in md
    assert "| Z_U | -1.5 | - |" in md
    assert "| info_rate_steps |" not in md and "| class_shares |" not in md
    assert '"lr": 0.003' in md  # the config
    found = links(md)
    assert "report/curves.png" in found and "samples/samples.png" in found and "report/classes.png" in found
    for rel in found:  # every picture the page shows lies beside it
        with Image.open(run_dir / rel) as im:
            assert im.width > 30
    with Image.open(run_dir / "report" / "curves.png") as im:
        assert im.width >= 800


def test_run_report_names_what_is_missing(tmp_path):
    md = run_report(fake_run(tmp_path / "b", with_eval=False)).read_text()
    assert "rcn eval --run" in md and "rcn sample --run" in md


def test_compare_report_has_a_row_per_run_and_the_config_differences(tmp_path):
    a, b = fake_run(tmp_path / "a", lr=1e-3), fake_run(tmp_path / "b", lr=3e-3, with_eval=False)
    path = compare_report([a, b], tmp_path / "cmp")
    md = path.read_text()
    table = [line for line in md.splitlines() if line.startswith(f"| {a}") or line.startswith(f"| {b}")]
    assert len(table) == 2
    assert "| 0.4 |" in table[0] and "| 0.4 |" in table[1]  # b falls back to its last test row (0.5 - 0.1)
    assert "| 535 |" in table[0] and "| 535 |" in table[1]
    assert "| train.lr | 0.001 | 0.003 |" in md
    assert (tmp_path / "cmp" / "compare.png").is_file()


def test_compare_report_folds_seeds_into_mean_and_half_range(tmp_path):
    runs = [fake_run(tmp_path / "rcn_s0", error=0.3), fake_run(tmp_path / "rcn_s1", seed=1, error=0.5),
            fake_run(tmp_path / "draw_s0", lr=1e-3, error=0.25)]
    md = compare_report(runs, tmp_path / "cmp").read_text()
    over = md.split("## Over seeds", 1)[1].split("\n\n", 2)[2].splitlines()
    assert over[2].startswith("| rcn | 2 | ") and "| 0.4 ± 0.1 |" in over[2]  # test_error 0.3 and 0.5
    assert over[3].startswith("| draw | 1 | ") and "| 0.25 |" in over[3]
    assert "`data.caps_input=grey`" in md  # the image every encoder saw, named once
    single = compare_report(runs[:1] + runs[2:], tmp_path / "cmp1").read_text()
    assert "## Over seeds" not in single  # nothing to fold: one seed each


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert cli.main(["report", "--run", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]
