"""`rcn report`: one Markdown page per run (`--run RUN_DIR`: RUN_DIR/report.md, plots in
RUN_DIR/report/), or a comparison of several runs for sweeps (`--runs A B C [--out DIR]`:
DIR/report.md, default runs/compare). docs/evaluation.md says what the pages hold. Pictures are
linked relative to the page, so the run directory can be copied or archived as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from rcn_dist.errors import RcnError
from rcn_dist.files import atomic_write

PARTS = ("loss", "elbo", "recon", "kl", "margin")
PICTURES = (
    ("samples/samples.png", "Unconditional samples (decoder means of the final canvas)"),
    ("samples/drawing.gif", "The drawing process: canvas after each step, write window in red"),
    ("samples/drawing_strip.png", "The same, step by step left to right, the window centre's path in yellow; "
     "last panel: every step's window, blue (first) to red (last)"),
    ("samples/reconstructions.png", "Test images (odd rows) and their reconstructions (even rows)"),
    ("samples/samples_by_class.png", "Samples grouped by the class the encoder's capsules give them"),
    ("samples/nearest.png", "Generated samples (top) and their nearest training images (bottom)"),
)
CAPS_SUMMARY = ("caps_decoder_shuffle", "caps_encoder_shuffle", "caps_decoder_spread")
"""Capsule usage columns of a comparison (`rcn eval`'s capsules part): what an ablation table needs."""
SUMMARY = ("test_error", "two_object_accuracy", "test_elbo", "test_bits_per_dim", "iw_nll", "info_active_units",
           "mi_lower", "frechet", "frechet_ref", "class_min_share", "c2st_accuracy", "nn_ratio", "copy_zu",
           "memorised", "window_area")
STEP_COLUMNS = (("info_rate_steps", "rate (nats)"), ("info_active_units_steps", "active units"),
                ("window_area_steps", "write window area"), ("window_x_steps", "window centre x (px)"),
                ("window_y_steps", "window centre y (px)"))
"""eval.json's per-step lists, as the columns of the report's per-step table."""


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of RUN_DIR/metrics.jsonl; a half-written last line is skipped."""
    train, evals = [], []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        (evals if row.get("kind") == "eval" else train).append(row)
    return train, evals


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "-" if v is None else str(v)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def eval_split(evals: list[dict]) -> str:
    """"val" when the loop evaluated on the validation split (val_* keys), else "test"."""
    return "val" if any("val_elbo" in r for r in evals) else "test"


def _pyplot():
    # Local: matplotlib (pyplot, ~0.4 s) is heavy and only the figures need it.
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot settles its backend on import

    return plt


def plot_curves(train: list[dict], evals: list[dict], path: Path, title: str = "") -> None:
    """One panel per loss part (train line, test markers), the test error and the LR."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    split = eval_split(evals)
    for ax, part in zip(axes.flat, (*PARTS, "error", "lr", "img_per_s")):
        pts = [(r["step"], r[part]) for r in train if part in r]
        tpts = [(r["step"], r[f"{split}_{part}"]) for r in evals if f"{split}_{part}" in r]
        if pts:  # the LR and the speed: train only, unlabelled
            ax.plot(*zip(*pts), **({"color": "tab:gray"} if part in ("lr", "img_per_s")
                                   else {"label": "train", "color": "tab:blue", "alpha": 0.8}))
        if tpts:
            ax.plot(*zip(*tpts), "o-", label=split, color="tab:red")
        if ax.get_legend_handles_labels()[1]:
            ax.legend()
        ax.set_title({"elbo": "negative ELBO (nats)", "recon": "-log D(x|c_T) (nats)", "kl": "KL (nats)",
                      "error": f"{split} error", "img_per_s": "images / s"}.get(part, part))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_classes(names: list[str], shares: list[float], shares_test: list[float], path: Path, title: str = "") -> None:
    """Bars of the samples' class shares beside the test images' (both by the feature classifier)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 3.5))
    pos = range(len(names))
    ax.bar([p - 0.2 for p in pos], shares_test, 0.4, label="test images", color="tab:gray")
    ax.bar([p + 0.2 for p in pos], shares, 0.4, label="prior samples", color="tab:red")
    ax.set_xticks(list(pos), names, rotation=30, ha="right")
    ax.set_ylabel("share (feature classifier)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def eval_sections(mets: dict[str, Any], run_dir: Path) -> list[str]:
    """The report's tables of eval.json beyond the numbers: per step (rate, active units, write
    window) and per class (with report/classes.png), where eval.json has them."""
    out: list[str] = []
    cols = [(k, head) for k, head in STEP_COLUMNS if isinstance(mets.get(k), list)]
    if cols:
        steps = max(len(mets[k]) for k, _ in cols)
        out += ["### Per drawing step", "",
                md_table(["step", *(h for _, h in cols)],
                         [[t + 1, *(mets[k][t] if t < len(mets[k]) else None for k, _ in cols)]
                          for t in range(steps)]), ""]
    if isinstance(mets.get("class_shares"), list) and isinstance(mets.get("class_shares_test"), list):
        names = mets.get("class_names") or [str(i) for i in range(len(mets["class_shares"]))]
        (run_dir / "report").mkdir(exist_ok=True)
        plot_classes(names, mets["class_shares"], mets["class_shares_test"], run_dir / "report" / "classes.png",
                     f"KL {_fmt(mets.get('class_kl'))} nats, rarest {mets.get('class_rarest')} "
                     f"{_fmt(mets.get('class_min_share'))}")
        out += ["### Classes of the prior samples", "", "![class shares](report/classes.png)", "",
                md_table(["class", "samples", "test images"],
                         [[n, p, q] for n, p, q in zip(names, mets["class_shares"], mets["class_shares_test"])]), ""]
    if isinstance(mets.get("copy_zu_cells"), list):
        out += ["### Data-copying test per cell", "",
                md_table(["cell", *map(str, range(len(mets["copy_zu_cells"])))], [["Z_U", *mets["copy_zu_cells"]]]), ""]
    return out


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.md (+ RUN_DIR/report/curves.png) and return its path."""
    if not run_dir.is_dir():
        raise RcnError(f"{run_dir}: no such run directory")
    cfg = _load_json(run_dir / "config.json")
    train, evals = read_metrics(run_dir)
    if cfg is None and not train:
        raise RcnError(f"{run_dir}: neither config.json nor metrics.jsonl: not a run directory")
    ev = _load_json(run_dir / "eval.json")
    name = run_dir.resolve().name
    out = [f"# Run `{name}`", ""]
    if cfg:
        m = cfg["model"]
        out.append(f"Preset `{cfg.get('name')}`: T={m['T']} steps, {m['rnn']} {m['enc_hidden']}/{m['dec_hidden']}, "
                   f"z={m['z_dim']}, read {m['read_n']}x{m['read_n']} ({'on' if m['read_attn'] else 'off'}), "
                   f"write {m['write_n']}x{m['write_n']} ({'on' if m['write_attn'] else 'off'}), "
                   f"{m['likelihood']} likelihood; data `{cfg['data']['dir']}`.")
    if train:
        last = train[-1]
        out.append(f"Trained {last['step']} steps ({last.get('samples', '?')} images); last train loss "
                   f"{_fmt(last['loss'])}, median speed {_fmt(sorted(r['img_per_s'] for r in train)[len(train) // 2])} "
                   "images/s.")
    out.append("")

    out += ["## Numbers", ""]
    if ev:
        mets = ev.get("metrics", {})
        out.append(f"`rcn eval` of `{ev.get('checkpoint')}` (step {ev.get('step')}), {ev.get('world_size')} rank(s)"
                   + (", **reduced** evaluation" if ev.get("reduced") else "")
                   + f"; eval settings: {', '.join(f'{k}={v}' for k, v in ev.get('eval', {}).items())}.")
        # Local: rcn_dist.eval imports torch, which a report of a run without eval.json never loads.
        from rcn_dist.eval import METRICS

        # The lists (per step, per class, per cell) get tables of their own below.
        scalar = {k: v for k, v in mets.items() if not isinstance(v, list)}
        order = [k for k in METRICS if k in scalar] + sorted(k for k in scalar if k not in METRICS)
        out += ["", md_table(["metric", "value", "meaning"], [[k, mets[k], METRICS.get(k, "")] for k in order]), ""]
        out += eval_sections(mets, run_dir)
    else:
        out += [f"No eval.json yet: `rcn eval --run {run_dir}`.", ""]

    out += ["## Loss curves", ""]
    if train or evals:
        (run_dir / "report").mkdir(exist_ok=True)
        plot_curves(train, evals, run_dir / "report" / "curves.png", name)
        out += ["![loss curves](report/curves.png)", ""]
        if evals:
            split = eval_split(evals)
            keys = [f"{split}_{k}" for k in ("error", "elbo", "recon", "kl", "margin") if f"{split}_{k}" in evals[-1]]
            keys += [k for k in ("caps_decoder_spread", "caps_decoder_length", "caps_encoder_spread",
                                 "caps_encoder_length", "info_active_units", "info_write_area") if k in evals[-1]]
            out += [md_table(["step", *keys], [[r["step"], *(r.get(k) for k in keys)] for r in evals]), ""]
    else:
        out += ["No metrics.jsonl yet.", ""]

    out += ["## Pictures", ""]
    have = [(p, cap) for p, cap in PICTURES if (run_dir / p).is_file()]
    for p, cap in have:
        out += [f"**{cap}**", "", f"![{cap}]({p})", ""]
    if not have:
        out += [f"No pictures yet: `rcn sample --run {run_dir}`.", ""]

    if cfg:
        out += ["## Config", "", "```json", json.dumps(cfg, indent=1), "```", ""]
    path = run_dir / "report.md"
    atomic_write(path, "\n".join(out))
    return path


SHARED_SETTINGS = ("data.caps_input", "data.binarize", "train.steps", "train.batch_size")
"""Settings a comparison names when every run shares them (what the encoder saw, the budget)."""


def seed_groups(flat: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Runs (keys of flat: run -> its config's "section.field" values) grouped by their config
    without train.seed (and the run's own paths), in order; each group named by its first run's
    directory name with a trailing _s<seed> / _seed<seed> taken off."""
    groups: dict[str, list[str]] = {}
    keys: dict[str, str] = {}
    for run, cfg in flat.items():
        key = json.dumps({k: v for k, v in sorted(cfg.items()) if k not in ("train.seed", "data.dir")}, default=str)
        name = keys.setdefault(key, re.sub(r"_(s|seed)\d+$", "", Path(run).name))
        groups.setdefault(name, []).append(run)
    return groups


def mean_pm(values: list[Any]) -> str:
    """"mean ± half the range" of the numbers among values; "-" when there are none."""
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return "-"
    mean, half = sum(nums) / len(nums), (max(nums) - min(nums)) / 2
    return f"{_fmt(mean)} ± {_fmt(half)}" if len(nums) > 1 else _fmt(mean)


def compare_report(runs: list[Path], out_dir: Path) -> Path:
    """A table with one row per run (config differences, final numbers) and overlaid curves."""
    plt = _pyplot()
    rows, flat, curves = [], {}, {}
    for r in runs:
        if not r.is_dir():
            raise RcnError(f"{r}: no such run directory")
        cfg = _load_json(r / "config.json") or {}
        train, evals = read_metrics(r)
        mets = (_load_json(r / "eval.json") or {}).get("metrics", {})
        last_eval = evals[-1] if evals else {}
        flat[str(r)] = {f"{s}.{k}": v for s, sec in cfg.items() if isinstance(sec, dict) for k, v in sec.items()}
        curves[str(r)] = (train, evals)
        speed = sorted(t["img_per_s"] for t in train if "img_per_s" in t)
        rows.append([str(r), cfg.get("name"), train[-1]["step"] if train else None,
                     train[-1]["loss"] if train else None,
                     *(mets.get(k, last_eval.get(k)) for k in SUMMARY + CAPS_SUMMARY),
                     speed[len(speed) // 2] if speed else None])
    # Config fields that differ between the runs: what the sweep changed.
    keys = sorted({k for f in flat.values() for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k)) for f in flat.values()}) > 1]
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run, (train, evals) in curves.items():
        label = Path(run).name
        if train:
            axes[0].plot([t["step"] for t in train], [t["loss"] for t in train], label=label)
        split = eval_split(evals)
        for ax, key in zip(axes[1:], (f"{split}_elbo", f"{split}_error")):
            tp = [(e["step"], e[key]) for e in evals if key in e]
            if tp:
                ax.plot(*zip(*tp), "o-", label=label)
    for ax, t in zip(axes, ("train loss", "negative ELBO (nats; validation split where there is one)",
                            "error (validation split where there is one)")):
        ax.set_title(t)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=80)
    plt.close(fig)
    text = ["# Comparison of runs", "",
            md_table(["run", "preset", "steps", "train loss", *SUMMARY, *CAPS_SUMMARY, "img/s (median)"], rows), "",
            "Numbers come from each run's eval.json, else its last test row in metrics.jsonl.", "",
            "![curves](compare.png)", ""]
    columns = ["train loss", *SUMMARY, *CAPS_SUMMARY]
    groups = seed_groups(flat)
    if any(len(g) > 1 for g in groups.values()):
        means = []
        for name, members in groups.items():
            values = [[rows[list(flat).index(r)][3 + i] for r in members] for i in range(len(columns))]
            means.append([name, len(members), *(mean_pm(v) for v in values)])
        text += ["## Over seeds", "",
                 "Runs whose configs differ only in `train.seed`, as one row: the mean ± half the range.", "",
                 md_table(["variant", "seeds", *columns], means), ""]
    shared = {k: next(iter(flat.values())).get(k) for k in SHARED_SETTINGS if k not in varying and flat}
    if shared:
        text += ["Shared by every run: " + ", ".join(f"`{k}={v}`" for k, v in shared.items() if v is not None), ""]
    if varying:
        text += ["## Config differences", "",
                 md_table(["field", *(Path(r).name for r in flat)], [[k, *(f.get(k) for f in flat.values())]
                                                                     for k in varying]), ""]
    path = out_dir / "report.md"
    atomic_write(path, "\n".join(text))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rcn report", description="A Markdown report of one run or several.")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="one run directory: writes RUN_DIR/report.md")
    g.add_argument("--runs", nargs="+", help="several run directories: a comparison page")
    ap.add_argument("--out", help="--runs: output directory (default runs/compare)")
    args = ap.parse_args(argv)
    path = (run_report(Path(args.run)) if args.run
            else compare_report([Path(r) for r in args.runs], Path(args.out or "runs/compare")))
    print(f"report: {path}")
    return 0


