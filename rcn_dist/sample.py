"""`rcn sample`: pictures of what a trained RCN draws and how.

    rcn sample --run RUN_DIR [--n 64] [--out DIR]
    rcn sample --run RUN_DIR --class K [--n 64] [--max-draws 10000] [eval.classifier_steps=S]

writes samples.png, drawing.gif, drawing_strip.png, reconstructions.png and samples_by_class.png
into DIR (default RUN_DIR/samples); docs/evaluation.md says what each shows. The red rectangle
spans the write filterbank (window_box). With --class K (an index or a class name of the data
set) it writes only class_K.png, prior samples of class K (samples_of_class), and class_K.json,
how often the data set's feature classifier agrees.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from rcn_dist import quality
from rcn_dist.config import ConfigError, apply_overrides
from rcn_dist.data.loader import EvalStream, Manifest
from rcn_dist.errors import DataError
from rcn_dist.evaluation import EVAL_NOISE_SEED, caps_input
from rcn_dist.files import atomic_write
from rcn_dist.model import sample_noise
from rcn_dist.model.attention import window_area
from rcn_dist.parallel.checkpoint import load_model

RED = (255, 0, 0)
PATH_COLOUR = (255, 210, 0)
"""The write window centre's path on the drawing strip."""
GREY_LEVELS = 255
"""GIF frames use palette indices 0..254 for grey levels and 255 for red."""
RED_INDEX = 255


# ---------------------------------------------------------------- image helpers
def grid(images: Tensor, ncol: int, scale: int = 2, pad: int = 2) -> Image.Image:
    """A grid of (N, C, H, W) images in [0, 1], ncol per row, each magnified `scale` times (grey
    images repeated over RGB)."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    rgb = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    n, h, w = rgb.shape[:3]
    nrow = max(1, math.ceil(n / ncol))
    out = Image.new("RGB", (ncol * (w * scale + pad) + pad, nrow * (h * scale + pad) + pad), (40, 40, 40))
    for i in range(n):
        tile = Image.fromarray(rgb[i]).resize((w * scale, h * scale), Image.NEAREST)
        out.paste(tile, (pad + (i % ncol) * (w * scale + pad), pad + (i // ncol) * (h * scale + pad)))
    return out


def window_box(cx: float, cy: float, delta: float, n: int, height: int, width: int,
               scale: int) -> tuple[int, int, int, int] | None:
    """The write window as an inclusive pixel box (x0, y0, x1, y1) on a tile magnified `scale`
    times, clipped to the tile; None when it lies wholly outside.

    DRAW's x = a + 1 is the centre of pixel column a (0-based; rcn_dist.model.attention), whose
    area is [a, a + 1) in continuous array coordinates u = x - 1/2; the window covers x in
    g -+ n/2 * delta.
    """
    half = n / 2 * delta
    u0, u1 = (cx - 0.5 - half) * scale, (cx - 0.5 + half) * scale
    v0, v1 = (cy - 0.5 - half) * scale, (cy - 0.5 + half) * scale
    x0, x1 = math.floor(u0 + 0.5), math.floor(u1 + 0.5) - 1  # round half up, not to even
    y0, y1 = math.floor(v0 + 0.5), math.floor(v1 + 0.5) - 1
    wmax, hmax = width * scale - 1, height * scale - 1
    if x1 < 0 or y1 < 0 or x0 > wmax or y0 > hmax:
        return None
    return max(x0, 0), max(y0, 0), min(max(x1, x0), wmax), min(max(y1, y0), hmax)


def window_figures(windows: dict[str, Tensor], n: int, height: int, width: int) -> dict[str, float | list]:
    """Per-step means over samples of the write window's area (`window_area`) and of its centre,
    in pixels from the image's left and top edges (DRAW's x - 0.5): windows holds cx, cy, delta,
    each (samples, T)."""
    area = window_area(windows["cx"].double(), windows["cy"].double(), windows["delta"].double(), n, height, width)
    return {"window_area_steps": area.mean(0).tolist(), "window_area": area.mean().item(),
            "window_x_steps": (windows["cx"].double() - 0.5).mean(0).tolist(),
            "window_y_steps": (windows["cy"].double() - 0.5).mean(0).tolist(), "window_samples": len(area)}


def drawing_frames(canvases: Tensor, windows: dict[str, Tensor] | None, write_n: int,
                   scale: int = 3, pad: int = 2) -> list[Image.Image]:
    """The drawing process as T palette images, one per step.

    canvases: (n, T, C, H, W) means in [0, 1] after each step; windows: cx, cy, delta each
    (n, T), or None (no write attention: no rectangle). Frame t shows the n canvases after step
    t side by side, grey levels as palette indices round(v * 254) (colour images are shown as
    their channel mean), the outline of step t's write window in palette index 255 (red).
    """
    n, steps, _, h, w = canvases.shape
    grey = (canvases.detach().float().mean(2).clamp(0, 1) * (GREY_LEVELS - 1)).round().to(torch.uint8).cpu()
    palette = [round(i * 255 / (GREY_LEVELS - 1)) for i in range(GREY_LEVELS) for _ in range(3)] + list(RED)
    frames = []
    for t in range(steps):
        frame = Image.new("P", (n * (w * scale + pad) + pad, h * scale + 2 * pad), 40)
        frame.putpalette(palette)
        draw = ImageDraw.Draw(frame)
        for i in range(n):
            ox, oy = pad + i * (w * scale + pad), pad
            tile = Image.fromarray(grey[i, t].numpy(), mode="L").resize((w * scale, h * scale), Image.NEAREST)
            frame.paste(tile, (ox, oy))
            if windows is not None:
                box = window_box(*(float(windows[k][i, t]) for k in ("cx", "cy", "delta")), write_n, h, w, scale)
                if box is not None:
                    draw.rectangle((ox + box[0], oy + box[1], ox + box[2], oy + box[3]), outline=RED_INDEX)
        frames.append(frame)
    return frames


def step_colour(t: int, steps: int) -> tuple[int, int, int]:
    """The colour of step t (0-based) of `steps` in the strip's summary panel: blue to red."""
    f = t / max(steps - 1, 1)
    return round(255 * f), round(120 * (1 - f)), round(255 * (1 - f))


def drawing_strip(canvases: Tensor, windows: dict[str, Tensor] | None, write_n: int, scale: int = 3,
                  pad: int = 2) -> Image.Image:
    """One row per sample of canvases (n, T, C, H, W): its T frames (drawing_frames: the canvas
    after step t, step t's write window in red) with the path of the window's centre over steps
    1..t in PATH_COLOUR (a line, a dot at each centre), then a summary panel: the final canvas
    with every step's window, coloured by step_colour, and the whole path. windows: cx, cy, delta
    each (n, T), or None (frames only, the summary panel shows the final canvas)."""
    n, steps, _, h, w = canvases.shape
    rows = []
    for i in range(n):
        win = None if windows is None else {k: v[i:i + 1] for k, v in windows.items()}
        frames = [f.convert("RGB") for f in drawing_frames(canvases[i:i + 1], win, write_n, scale, pad)]
        # The final canvas without a window.
        summary = drawing_frames(canvases[i:i + 1, -1:], None, write_n, scale, pad)[0].convert("RGB")
        if win is not None:
            # Centres on the magnified tile: DRAW's x = a + 1 is the middle of pixel column a.
            path = [(pad + (float(win["cx"][0, t]) - 0.5) * scale, pad + (float(win["cy"][0, t]) - 0.5) * scale)
                    for t in range(steps)]
            draw = ImageDraw.Draw(summary)
            for t in range(steps):
                box = window_box(*(float(win[k][0, t]) for k in ("cx", "cy", "delta")), write_n, h, w, scale)
                if box is not None:
                    draw.rectangle((pad + box[0], pad + box[1], pad + box[2], pad + box[3]),
                                   outline=step_colour(t, steps))
            for t, frame in enumerate([*frames, summary]):
                d = ImageDraw.Draw(frame)
                upto = path[:t + 1]  # the summary panel (t = steps): the whole path
                if len(upto) > 1:
                    d.line(upto, fill=PATH_COLOUR)
                for x, y in upto:
                    d.rectangle((x - 1, y - 1, x + 1, y + 1), fill=PATH_COLOUR)
        rows.append([*frames, summary])
    fw, fh = rows[0][0].size
    out = Image.new("RGB", (fw * (steps + 1), fh * n))
    for i, row in enumerate(rows):
        for t, f in enumerate(row):
            out.paste(f, (t * fw, i * fh))
    return out


def labelled_rows(rows: list[tuple[str, Tensor]], ncol: int, scale: int = 2, pad: int = 2,
                  label_w: int = 90) -> Image.Image:
    """One labelled row of images per entry (label, (k, C, H, W)); rows may be empty."""
    h, w = next((x.shape[2:] for _, x in rows if len(x)), (28, 28))
    row_h = h * scale + pad
    out = Image.new("RGB", (label_w + ncol * (w * scale + pad) + pad, len(rows) * row_h + pad), (40, 40, 40))
    draw = ImageDraw.Draw(out)
    for r, (label, imgs) in enumerate(rows):
        draw.text((4, pad + r * row_h + row_h // 2 - 6), label[:14], fill=(230, 230, 230))
        if len(imgs):
            out.paste(grid(imgs[:ncol], ncol, scale, pad), (label_w - pad, r * row_h))
    return out


# ---------------------------------------------------------------- the command
@torch.no_grad()
def generate(model, n: int, seed: int, device: str, batch: int = 64) -> tuple[Tensor, dict[str, Tensor] | None]:
    """n samples in batches: canvases (n, T, C, H, W) on the CPU and write windows (n, T) or None."""
    c = model.cfg
    eps = torch.randn(n, c.T, c.z_dim, generator=torch.Generator().manual_seed(seed))  # the same every time
    parts, wins = [], []
    for i in range(0, n, batch):
        canv, win = model.generate(len(eps[i:i + batch]), eps[i:i + batch].to(device), device=device)
        parts.append(canv.float().cpu())
        wins.append(None if win is None else {k: v.float().cpu() for k, v in win.items()})
    return torch.cat(parts), (None if wins[0] is None else
                              {k: torch.cat([w[k] for w in wins]) for k in wins[0]})


CLASS_BATCH = 256
"""Prior samples drawn and classified at a time by samples_of_class."""
MAX_DRAWS = 10_000
"""samples_of_class's default cap on prior samples drawn (--max-draws)."""


def capsule_view(images: Tensor, cfg) -> Tensor:
    """What the encoder capsules see of generated images (N, C, H, W) decoder means: the means
    themselves where the capsules saw grey images in training (data.caps_input=grey, or a
    likelihood of grey levels), else the means binarised at 0.5. cfg is the run's Config."""
    grey = cfg.model.likelihood != "bernoulli" or cfg.data.caps_input == "grey"
    return images if grey else (images > 0.5).float()


@torch.no_grad()
def capsule_classes(model, cfg, images: Tensor, batch: int = 512) -> Tensor:
    """The model's own classification of images (N, C, H, W) on the CPU: the index of the longest
    encoder class capsule (N,), the images seen as capsule_view shows them."""
    dev = next(model.parameters()).device
    view = capsule_view(images, cfg)
    return torch.cat([model.encoder.capsules(view[i:i + batch].to(dev)).norm(dim=-1).argmax(1).cpu()
                      for i in range(0, len(view), batch)])


def class_index(spec: str, names: list[str]) -> int:
    """--class as a class index: an integer 0..len(names)-1, or a class name (case ignored)."""
    if spec.strip().lstrip("-").isdigit():
        k = int(spec)
        if 0 <= k < len(names):
            return k
        raise ConfigError(f"--class {spec}: the data set has classes 0..{len(names) - 1} ({', '.join(names)})")
    folded = [n.casefold() for n in names]
    if spec.strip().casefold() in folded:
        return folded.index(spec.strip().casefold())
    raise ConfigError(f"--class {spec!r}: no such class; the data set's classes are {', '.join(names)} "
                      f"(or their indices 0..{len(names) - 1})")


@torch.no_grad()
def samples_of_class(model, cfg, k: int, n: int, seed: int, device: str, max_draws: int = MAX_DRAWS,
                     batch: int = CLASS_BATCH) -> tuple[Tensor, int]:
    """Prior samples of class k: the first n prior samples, in index order, whose own encoder
    class capsules put k longest (capsule_classes). Returns their decoder means (m, C, H, W) on
    the CPU, m <= n, and how many prior samples were drawn: the index of the n-th kept one plus
    one, or max_draws when fewer than n were found by then.

    Why this method: it leaves the model as the paper has it and asks no new fit. The decoder
    takes only z_t, and no margin loss gives its capsules a class (docs/evaluation.md), so
    nothing inside it can be told a class; a per-class Gaussian over the posterior means would
    be one more model, whose samples need not lie where the prior puts mass. Rejection sampling
    draws from the prior restricted to the region the model's own classifier calls k: prior
    samples as the model draws them, filtered by the model itself. Its cost is 1 / acceptance
    draws per sample, which is also a figure (how often the model draws k).

    Sample i's noise is sample_noise(i, seed): the kept set does not depend on `batch` or the
    device's batch split, and the same seed gives the same images.
    """
    c = model.cfg
    kept, found, drawn = [], 0, 0
    while found < n and drawn < max_draws:
        b = min(batch, max_draws - drawn)
        eps = sample_noise(torch.arange(drawn, drawn + b), seed, c.T, c.z_dim)
        final = model.generate(b, eps.to(device), device=device)[0][:, -1].float().cpu()  # (b, C, H, W)
        hit = (capsule_classes(model, cfg, final) == k).nonzero()[:, 0]
        if found + len(hit) >= n:  # stop at the n-th: drawn counts the samples up to it
            hit = hit[:n - found]
            b = int(hit[-1]) + 1
        kept.append(final[hit])
        found, drawn = found + len(hit), drawn + b
    return torch.cat(kept), drawn


def class_samples(model, cfg, args, data_dir: str, out_dir: Path, device: str) -> int:
    """`rcn sample --class K`: class_K.png (up to --n samples of class K, samples_of_class) and
    class_K.json (the kept and drawn counts, the acceptance rate kept / drawn, and the share of the
    kept samples that the data set's feature classifier, rcn_dist.quality, also calls K, with its
    95% Wilson interval). Exit 0 when any were found, else 1 (the JSON is written either way)."""
    try:
        manifest = Manifest.load(data_dir)
    except DataError as e:
        raise DataError(f"{e}{'' if args.data else ' (pass --data DIR)'}") from None
    m = cfg.model
    if manifest.n_classes != m.n_classes:
        raise ConfigError(f"data {data_dir} holds {manifest.n_classes} classes; the model has {m.n_classes}")
    names = manifest.class_names
    k = class_index(args.klass, names)
    if model.encoder.capsules is None:
        raise ConfigError("--class needs the encoder's class capsules; this model has none "
                          "(model.enc_capsules=false)")
    with torch.enable_grad():  # main runs without gradients; a classifier not yet cached is trained here
        net, known = quality.feature_classifier(data_dir, quality.classifier_dir(data_dir, Path(args.run)),
                                                cfg.eval.classifier_steps, progress=True, device=device)
    kept, drawn = samples_of_class(model, cfg, k, args.n, args.seed, device, args.max_draws)
    said = quality.logits_of(net, kept).argmax(1) if len(kept) else torch.zeros(0, dtype=torch.long)
    agree = int((said == k).sum())
    lo, hi = quality.wilson_interval(agree, len(kept))
    figures = {
        "class": k, "class_name": names[k], "seed": args.seed, "wanted": args.n, "kept": len(kept),
        "drawn": drawn, "max_draws": args.max_draws, "acceptance": len(kept) / drawn,
        "agreement": agree / len(kept) if len(kept) else None,
        "agreement_low": lo if len(kept) else None, "agreement_high": hi if len(kept) else None,
        "classifier_classes": {names[j]: int((said == j).sum()) for j in range(len(names))},
        "classifier_test_accuracy": known["test_accuracy"], "classifier_cache": known["cache"],
        "run": str(args.run), "data": str(data_dir),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if len(kept):
        written.append(out_dir / f"class_{k}.png")
        grid(kept, ncol=math.ceil(math.sqrt(len(kept))), scale=2).save(written[-1])
    written.append(out_dir / f"class_{k}.json")
    atomic_write(written[-1], json.dumps(figures, indent=1) + "\n")
    short = "" if len(kept) == args.n else f" (of {args.n} wanted; --max-draws {args.max_draws})"
    agreed = (f"; the feature classifier ({known['test_accuracy']:.1%} on the test set) agrees on {agree} "
              f"({agree / len(kept):.1%}, 95% {lo:.1%}..{hi:.1%})" if len(kept) else "")
    print(f"{names[k]} (class {k}): kept {len(kept)} of {drawn} prior samples drawn{short}, acceptance "
          f"{100 * len(kept) / drawn:.3g}%{agreed}; wrote " + ", ".join(map(str, written)), flush=True)
    return 0 if len(kept) else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rcn sample", description="Samples, the drawing process, reconstructions.")
    ap.add_argument("--run", required=True, help="run, checkpoint or export directory")
    ap.add_argument("--n", type=int, default=64, help="unconditional samples in the grid (default 64)")
    ap.add_argument("--animate", type=int, default=8, help="samples in the drawing animation (default 8)")
    ap.add_argument("--recon", type=int, default=16, help="test images to reconstruct (default 16)")
    ap.add_argument("--out", help="output directory (default RUN_DIR/samples)")
    ap.add_argument("--data", help="prepared data directory for reconstructions (default: the run's data.dir)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prior noise (default 0)")
    ap.add_argument("--scale", type=int, default=3, help="screen pixels per image pixel (default 3)")
    ap.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    ap.add_argument("--class", dest="klass", metavar="K",
                    help="only samples of class K (an index or a class name): class_K.png and class_K.json")
    ap.add_argument("--max-draws", type=int, default=MAX_DRAWS,
                    help=f"with --class: prior samples drawn at most (default {MAX_DRAWS})")
    ap.add_argument("overrides", nargs="*", help="eval.field=value, e.g. eval.classifier_steps=1300")
    return ap


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("n", "animate", "recon", "scale", "max_draws"):
        if getattr(args, name) < (1 if name in ("n", "scale", "max_draws") else 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    # Only eval.* may be overridden (as in `rcn eval`): anything else would not describe the checkpoint.
    if bad := [o for o in args.overrides if not o.strip().startswith("eval.")]:
        raise ConfigError(f"rcn sample takes only eval.* overrides, got {bad[0]!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, where = load_model(args.run, device)
    cfg = apply_overrides(cfg, args.overrides) if args.overrides else cfg
    m = cfg.model
    out_dir = Path(args.out) if args.out else (Path(args.run) / "samples")
    if args.klass is not None:
        return class_samples(model, cfg, args, args.data or cfg.data.dir, out_dir, device)
    out_dir.mkdir(parents=True, exist_ok=True)

    canvases, windows = generate(model, max(args.n, args.animate), args.seed, device)
    final = canvases[:, -1]
    written = [out_dir / "samples.png"]
    grid(final[: args.n], ncol=math.ceil(math.sqrt(args.n)), scale=2).save(written[0])

    if args.animate:
        k = args.animate
        frames = drawing_frames(canvases[:k], None if windows is None else {x: v[:k] for x, v in windows.items()},
                                m.write_n, scale=args.scale)
        # An endless GIF; the last frame (the finished drawing) stays longer.
        frames[0].save(out_dir / "drawing.gif", save_all=True, append_images=frames[1:],
                       duration=[250] * (len(frames) - 1) + [1500], loop=0, optimize=False, disposal=1)
        # The strip: each sample's frames left to right in step order, one row per sample (up to 4),
        # with the window centre's path and a summary panel of every step's window.
        r = min(k, 4)
        drawing_strip(canvases[:r], None if windows is None else {x: v[:r] for x, v in windows.items()},
                      m.write_n, args.scale).save(out_dir / "drawing_strip.png")
        written += [out_dir / "drawing.gif", out_dir / "drawing_strip.png"]

    data_dir = args.data or cfg.data.dir
    if args.recon:
        try:
            manifest = Manifest.load(data_dir)
        except DataError as e:
            print(f"no reconstructions: {e} (pass --data DIR)", flush=True)
        else:
            binarize = "none" if cfg.data.binarize == "none" else "fixed"
            batch = next(iter(EvalStream(data_dir, args.recon, 0, 1, binarize=binarize)))
            keep = batch["mask"]
            x, idx = batch["image"][keep], batch["index"][keep]
            eps = sample_noise(idx, cfg.train.seed + EVAL_NOISE_SEED, m.T, m.z_dim)
            out = model(x.to(device), eps.to(device), caps_input(batch, cfg, device, keep))
            rec = torch.sigmoid(out.canvas[:, -1]).float().cpu()
            ncol = min(8, len(x))
            # Originals, then their reconstructions, ncol per row (blank-padded).
            rows = [torch.cat([part, torch.zeros(ncol - len(part), *part.shape[1:])])
                    for i in range(0, len(x), ncol) for part in (x[i:i + ncol], rec[i:i + ncol])]
            grid(torch.cat(rows), ncol=ncol, scale=2).save(out_dir / "reconstructions.png")
            written.append(out_dir / "reconstructions.png")

            # The encoder's capsules classify the samples (binarised like the training inputs).
            if model.encoder.capsules is not None:
                cls = capsule_classes(model, cfg, final)
                labelled_rows([(manifest.class_names[k], final[cls == k]) for k in range(m.n_classes)],
                              ncol=8).save(out_dir / "samples_by_class.png")
                written.append(out_dir / "samples_by_class.png")

    print(f"{where}: wrote " + ", ".join(str(p) for p in written), flush=True)
    return 0


