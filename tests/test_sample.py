"""`rcn sample`: the drawing animation of a decoder that writes a known pattern at a known place."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from rcn_dist.config import preset
from rcn_dist.model import RCN
from rcn_dist.model.attention import filterbank
from rcn_dist.sample import PATH_COLOUR, generate, main, step_colour, window_box

CX, CY, DELTA, SIGMA2 = 11.0, 16.0, 2.0, 0.5  # DRAW pixel units: column a has its centre at x = a + 1
SCALE, PAD = 4, 2


def fixed_writer_model() -> RCN:
    """A tiny RCN whose writer ignores h_dec: every step adds the same 3x3 patch (all 2.0 logits)
    through a window centred at (CX, CY) with stride DELTA, so the canvas after step t is
    t times one increment."""
    cfg = preset("tiny").model
    torch.manual_seed(0)
    model = RCN(cfg).eval()
    w = model.decoder.writer
    n, size = cfg.write_n, cfg.width
    # window_params inverted: gx = (A + 1)/2 (gx~ + 1), delta = (A - 1)/(N - 1) exp(log delta~).
    raw = [2 * CX / (size + 1) - 1, 2 * CY / (cfg.height + 1) - 1, math.log(SIGMA2),
           math.log(DELTA * (n - 1) / (size - 1)), 0.0]
    with torch.no_grad():
        w.window.weight.zero_()
        w.window.bias.copy_(torch.tensor(raw))
        w.patch.weight.zero_()
        w.patch.bias.fill_(2.0)
    return model


def export(model: RCN, d) -> None:
    d.mkdir(parents=True)
    cfg = preset("tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(cfg.to_json())


def test_window_box_spans_the_write_filterbank():
    """The rectangle reaches delta/2 beyond the first and last filter centres: N x delta wide."""
    n = preset("tiny").model.write_n
    box = window_box(CX, CY, DELTA, n, 28, 28, SCALE)
    # x from 11 - 1.5 * 2 = 8 to 14 in DRAW units = 7.5 .. 13.5 in array units, x4.
    assert box == (30, 50, 53, 73)
    fx, fy = filterbank(torch.tensor([CX]), torch.tensor([CY]), torch.tensor([DELTA]), torch.tensor([0.01]),
                        n, 28, 28)
    cols, rows = fx[0].argmax(1).tolist(), fy[0].argmax(1).tolist()  # pixel under each filter centre
    assert cols == [8, 10, 12] and rows == [13, 15, 17]
    assert box[0] == (cols[0] + 0.5 - DELTA / 2) * SCALE and box[2] + 1 == (cols[-1] + 0.5 + DELTA / 2) * SCALE
    assert box[1] == (rows[0] + 0.5 - DELTA / 2) * SCALE and box[3] + 1 == (rows[-1] + 0.5 + DELTA / 2) * SCALE
    assert window_box(-20.0, CY, DELTA, n, 28, 28, SCALE) is None


def test_drawing_animation_shows_each_step_and_its_write_window(tmp_path):
    model = fixed_writer_model()
    export(model, tmp_path / "export")
    out = tmp_path / "pics"
    assert main(["--run", str(tmp_path / "export"), "--n", "4", "--animate", "2", "--recon", "0",
                 "--scale", str(SCALE), "--out", str(out)]) == 0
    T = model.cfg.T
    canvases, windows = generate(model, 2, seed=0, device="cpu")  # the command's own samples
    assert torch.allclose(windows["cx"], torch.full((2, T), CX)) and torch.allclose(windows["delta"], torch.full((2, T), DELTA))

    gif = Image.open(out / "drawing.gif")
    assert gif.n_frames == T
    box = (30, 50, 53, 73)
    outline = np.zeros((28 * SCALE, 28 * SCALE), bool)
    outline[box[1]:box[3] + 1, [box[0], box[2]]] = True
    outline[[box[1], box[3]], box[0]:box[2] + 1] = True
    centre = []
    for t in range(T):
        gif.seek(t)
        frame = np.asarray(gif.convert("RGB"))
        for i in range(2):
            x0 = PAD + i * (28 * SCALE + PAD)
            tile = frame[PAD:PAD + 28 * SCALE, x0:x0 + 28 * SCALE]
            red = (tile == [255, 0, 0]).all(-1)
            assert (red == outline).all(), f"frame {t}, sample {i}: red pixels are not the window's outline"
            # Everything else is the canvas after step t (grey level round(v * 254) of 255).
            want = np.kron((canvases[i, t, 0] * 254).round().numpy(), np.ones((SCALE, SCALE)))
            want = np.round(want * 255 / 254)
            assert (tile[~red][:, 0] == want[~red]).all(), f"frame {t}, sample {i}: canvas differs"
            assert (tile[~red][:, 0] == tile[~red][:, 1]).all()
        centre.append(tile[15 * SCALE + 1, 10 * SCALE + 1, 0])
    assert all(a < b for a, b in zip(centre, centre[1:])), centre  # the pattern is drawn step by step
    # The last frame is the final canvas, and the final canvas is brightest inside the window.
    final = canvases[0, -1, 0]
    r, c = divmod(int(final.argmax()), 28)
    assert 13 <= r <= 17 and 8 <= c <= 12
    samples = np.asarray(Image.open(out / "samples.png").convert("L"))
    assert samples.shape == (2 * (56 + 2) + 2,) * 2
    tile = 28 * SCALE + 2 * PAD
    strip = Image.open(out / "drawing_strip.png").convert("RGB")
    assert strip.size == ((T + 1) * tile, 2 * tile)  # a row of T steps and a summary panel per sample
    px = np.asarray(strip)
    # The window centre's path: a dot at (CX, CY) in every frame (DRAW's x = a + 1, magnified).
    u, v = round((CX - 0.5) * SCALE), round((CY - 0.5) * SCALE)
    for i in range(2):
        for t in range(T + 1):
            assert tuple(px[i * tile + PAD + v, t * tile + PAD + u]) == PATH_COLOUR, (i, t)
    # The summary panel: every step's window outline (here all the same, the last step's colour on
    # top) over the final canvas.
    x0, y0 = T * tile + PAD, PAD
    assert all(tuple(px[y0 + y, x0 + box[0]]) == step_colour(T - 1, T) for y in range(box[1], box[3] + 1))
    want = np.round(np.round(canvases[0, -1, 0].numpy() * 254) * 255 / 254)
    assert px[y0 + 5 * SCALE, x0 + 5 * SCALE, 0] == want[5, 5]  # outside the window: the final canvas


def test_sample_command_writes_every_picture(fmnist_small, tmp_path):
    export(fixed_writer_model(), tmp_path / "export")
    out = tmp_path / "pics"
    assert main(["--run", str(tmp_path / "export"), "--n", "9", "--animate", "3", "--recon", "6",
                 "--data", str(fmnist_small), "--out", str(out)]) == 0
    for name in ("samples.png", "drawing.gif", "drawing_strip.png", "reconstructions.png", "samples_by_class.png"):
        with Image.open(out / name) as im:
            assert im.width > 50 and im.height > 50, name
    rec = Image.open(out / "reconstructions.png")
    assert rec.size == (6 * 58 + 2, 2 * 58 + 2)  # one row of 6 originals, one of reconstructions
