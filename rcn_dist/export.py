"""`rcn export`: a run's weights as a directory anyone can load without our checkpoints.

    rcn export --run RUN_DIR --out DIR [--step N]

DIR gets model.safetensors (consolidated float32 weights, whatever ZeRO stage or rank layout
trained them), config.json (the full resolved config) and README.md (a short model card). Load it
with ``rcn_dist.parallel.checkpoint.load_model(DIR)``, as a run or checkpoint is loaded, or give it
to ``rcn eval --run DIR`` / ``rcn sample --run DIR``.
Nothing in DIR is a pickle: safetensors is a JSON header plus raw tensor bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from rcn_dist import __version__
from rcn_dist.errors import CheckpointError
from rcn_dist.files import atomic_write
from rcn_dist.parallel.checkpoint import COMPLETE, ckpt_root, find_latest, load_model, saved_layout, tag_for


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The complete checkpoint of `run_dir` at `step` (default: the newest one)."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if step is not None:
        d = ckpt_root(run_dir) / tag_for(step)
        if not (d / COMPLETE).is_file():
            have = sorted(int(p.name[5:]) for p in ckpt_root(run_dir).glob("step_*") if (p / COMPLETE).is_file())
            raise CheckpointError(f"{run_dir}: no complete checkpoint at step {step} "
                                  f"(complete: {', '.join(map(str, have)) or 'none'})")
        return d
    best, _ = find_latest(run_dir)
    if best is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint to export (in {ckpt_root(run_dir)})")
    return best


def recorded_metrics(run_dir: Path, step: int) -> tuple[dict[str, Any], str]:
    """Test metrics of the checkpoint at `step`: `rcn eval`'s eval.json if it evaluated this step,
    else the loop's last full evaluation at that step in metrics.jsonl; ({}, "") if neither."""
    ev = run_dir / "eval.json"
    if ev.is_file():
        report = json.loads(ev.read_text())
        if report.get("step") == step:
            return report.get("metrics", {}), "`rcn eval` (eval.json)"
    rows = run_dir / "metrics.jsonl"
    if rows.is_file():
        for line in reversed(rows.read_text().splitlines()):
            r = json.loads(line)
            if r.get("kind") == "eval" and r.get("step") == step and r.get("full", True):
                return ({k: v for k, v in r.items() if k.startswith(("test_", "val_"))},
                        "the training loop's evaluation (metrics.jsonl)")
    return {}, ""


def _card(cfg, name: str, step: int, n_params: int, sha: str, metrics: dict[str, Any], source: str) -> str:
    m = cfg.model
    lines = [
        f"# RCN ({cfg.name} preset), step {step}", "",
        "Recurrent Capsule Network (DRAW with capsule networks before its encoder and decoder RNNs), "
        f"exported by rcn_dist {__version__}.", "",
        f"- steps trained: {step} (global batch {cfg.train.batch_size})",
        f"- image: {m.in_channels}x{m.height}x{m.width}, {m.n_classes} classes, likelihood {m.likelihood}",
        f"- T={m.T}, {m.rnn.upper()} {m.enc_hidden}/{m.dec_hidden}, z={m.z_dim}, routing r={m.routing_iters}",
        f"- parameters: {n_params:,} (float32)",
        f"- model.safetensors sha256: {sha}", "",
    ]
    if metrics:
        lines += ["## Test metrics", "", f"From {source}.", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No test metrics were recorded for this step (run `rcn eval --run` on it).")
    lines += ["", "## Loading", "", "```python", "from rcn_dist.parallel.checkpoint import load_model",
              f'cfg, model, _ = load_model("{name}")  # safetensors + JSON, no pickle; eval mode', "```", ""]
    return "\n".join(lines)


def export(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write model.safetensors, config.json and README.md for a run's checkpoint into `out`."""
    run_dir, out = Path(run_dir), Path(out)
    ckpt = find_checkpoint(run_dir, step)
    cfg, model, _ = load_model(ckpt)  # checks that the weights fit the stored config
    step = saved_layout(ckpt).get("step", int(ckpt.name[5:]))
    weights = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", save(weights, metadata={
        "format": "pt", "rcn_dist": __version__, "step": str(step), "preset": cfg.name}))
    atomic_write(out / "config.json", cfg.to_json() + "\n")
    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    metrics, source = recorded_metrics(run_dir, step)
    n_params = sum(v.numel() for v in weights.values())
    atomic_write(out / "README.md", _card(cfg, out.name, step, n_params, sha, metrics, source))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rcn export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run directory (holds checkpoints/)")
    ap.add_argument("--out", required=True, help="directory to write the export into")
    ap.add_argument("--step", type=int, help="export this step's checkpoint (default: the newest)")
    args = ap.parse_args(argv)
    out = export(args.run, args.out, args.step)
    print(f"exported {args.run} to {out} (model.safetensors, config.json, README.md)")
    return 0
