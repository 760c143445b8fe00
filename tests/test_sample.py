"""`rcn sample`: the drawing animation of a decoder that writes a known pattern at a known place, and
samples of a chosen class (`--class K`) against the model's own classification."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rcn_dist import cli, quality
from rcn_dist.config import preset
from rcn_dist.data.loader import Manifest
from rcn_dist.model import RCN, sample_noise
from rcn_dist.model.attention import filterbank
from rcn_dist.sample import (
    PATH_COLOUR,
    class_index,
    generate,
    main,
    samples_of_class,
    step_colour,
    window_box,
)

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


# ---------------------------------------------------------------- samples of a chosen class
SEED, DRAWS = 3, 512


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    """A tiny random RCN, exported, and its own classification of its first DRAWS prior samples
    (seed SEED), computed here through the model's forward pass (RCNOutput.class_lengths) with the
    samples' means as what the capsules see (the tiny preset's data.caps_input=grey). Its writer's
    patch weights are 300 times their initial values: at init the samples differ by 0.001 per
    pixel and the capsules call every one the same class; so they differ by 0.08 and get four."""
    torch.manual_seed(0)
    model = RCN(preset("tiny").model).eval()
    with torch.no_grad():
        model.decoder.writer.patch.weight.mul_(300)
    d = tmp_path_factory.mktemp("classrun") / "export"
    export(model, d)
    c = model.cfg
    with torch.no_grad():
        means = model.generate(DRAWS, sample_noise(torch.arange(DRAWS), SEED, c.T, c.z_dim))[0][:, -1]
        classes = model((means > 0.5).float(), x_caps=means).class_lengths.argmax(1)
    return model, d, means, classes


def test_class_samples_are_the_prior_samples_the_models_capsules_call_k(class_model, fmnist_small, tmp_path):
    model, d, means, classes = class_model
    counts = torch.bincount(classes, minlength=10)
    k = int(counts.argsort(descending=True)[1])  # the second most common: most samples are rejected
    assert 12 <= counts[k] < DRAWS / 2, counts
    out = tmp_path / "pics"
    assert main(["--run", str(d), "--data", str(fmnist_small), "--class", str(k), "--n", "12", "--seed", str(SEED),
                 "--out", str(out), "eval.classifier_steps=20"]) == 0
    fig = json.loads((out / f"class_{k}.json").read_text())
    # Kept: the first 12 samples the capsules call k; drawn: up to and including the 12th.
    idx = (classes == k).nonzero()[:, 0][:12]
    assert fig["kept"] == 12 and fig["drawn"] == int(idx[-1]) + 1 and fig["acceptance"] == 12 / fig["drawn"], fig
    kept, drawn = samples_of_class(model, preset("tiny"), k, 12, SEED, "cpu", batch=5)  # another batch split
    assert drawn == fig["drawn"] and torch.allclose(kept, means[idx], atol=1e-6)
    with torch.no_grad():
        assert (model(kept, x_caps=kept).class_lengths.argmax(1) == k).all()
    # The agreement: the data set's feature classifier (cached beside the shards) on the kept samples.
    net, known = quality.feature_classifier(fmnist_small, quality.classifier_dir(fmnist_small, tmp_path), 20)
    said = quality.logits_of(net, means[idx]).argmax(1)
    assert known["trained"] is False and fig["agreement"] == pytest.approx(float((said == k).double().mean()))
    assert fig["agreement_low"] <= fig["agreement"] <= fig["agreement_high"]
    assert sum(fig["classifier_classes"].values()) == 12 and fig["class_name"] == Manifest.load(fmnist_small).class_names[k]
    with Image.open(out / f"class_{k}.png") as im:
        assert im.size == (4 * 58 + 2, 3 * 58 + 2)  # 12 samples, 4 per row

    # The same seed gives the same images; another seed others.
    again = tmp_path / "again"
    assert main(["--run", str(d), "--data", str(fmnist_small), "--class", Manifest.load(fmnist_small).class_names[k].upper(),
                 "--n", "12", "--seed", str(SEED), "--out", str(again), "eval.classifier_steps=20"]) == 0
    assert (again / f"class_{k}.png").read_bytes() == (out / f"class_{k}.png").read_bytes()
    assert json.loads((again / f"class_{k}.json").read_text()) == fig
    other, _ = samples_of_class(model, preset("tiny"), k, 12, SEED + 1, "cpu")
    assert not torch.allclose(other, kept)


def test_a_class_the_model_never_draws_is_one_line_and_exit_1(class_model, fmnist_small, tmp_path, capsys):
    _, d, _, classes = class_model
    k = int(torch.bincount(classes[:64], minlength=10).argmin())
    assert (classes[:64] != k).all()
    out = tmp_path / "none"
    assert main(["--run", str(d), "--data", str(fmnist_small), "--class", str(k), "--max-draws", "64",
                 "--out", str(out), "--seed", str(SEED), "eval.classifier_steps=20"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "kept 0 of 64" in lines[0], lines
    fig = json.loads((out / f"class_{k}.json").read_text())
    assert fig["kept"] == 0 and fig["acceptance"] == 0 and fig["agreement"] is None
    assert not (out / f"class_{k}.png").exists()


def test_a_bad_class_is_one_error_line(class_model, fmnist_small, tmp_path, capsys):
    _, d, _, _ = class_model
    names = Manifest.load(fmnist_small).class_names
    assert class_index("sandal", names) == class_index("5", names) == 5 and names[5] == "Sandal"
    for bad, says in (("10", "classes 0..9"), ("-1", "classes 0..9"), ("Sandals", "no such class")):
        rc = cli.main(["sample", "--run", str(d), "--data", str(fmnist_small), "--class", bad,
                       "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("rcn: error: --class") and says in err[0], err
        assert "Sandal" in err[0]
    assert not (tmp_path / "x").exists()
