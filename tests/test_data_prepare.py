"""`rcn prepare` and the source readers: round trips, determinism, and every bad input."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from _datautil import (
    FASHION,
    make_cifar_dir,
    make_idx_dir,
    py2_cifar_pickle,
    run_prepare,
    tar_gz_of,
    write_idx,
)

from rcn_dist.data import sources
from rcn_dist.data.idx import read_idx
from rcn_dist.data.loader import Manifest, load_arrays
from rcn_dist.errors import DataError

pytestmark = pytest.mark.filterwarnings("error::ResourceWarning")
needs_fashion = pytest.mark.usefixtures("fashion_installed")


@pytest.fixture
def fashion_installed() -> None:
    # Installed by launch/setup.sh: missing is a failure, never a skip.
    assert (FASHION / "train-images-idx3-ubyte.gz").is_file(), (
        f"{FASHION} is missing: install Debian's dataset-fashion-mnist (launch/setup.sh does)")


def _only_entries(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@needs_fashion
def test_fashion_mnist_round_trip(tmp_path):
    out = tmp_path / "fm"
    rc, _ = run_prepare(["--dataset", "fashion-mnist", "--out", str(out), "--limit", "700",
                         "--shard-size", "256"])
    assert rc == 0
    m = Manifest.load(out)
    assert m.image_shape == (1, 28, 28) and m.class_names == sources.FASHION_CLASSES
    assert [s["samples"] for s in m.shards("train")] == [256, 256, 188]
    for split, stem in (("train", "train"), ("test", "t10k")):
        images, labels, index = load_arrays(out, split)
        src_x = read_idx(FASHION / f"{stem}-images-idx3-ubyte.gz")[:700]
        src_y = read_idx(FASHION / f"{stem}-labels-idx1-ubyte.gz")[:700]
        np.testing.assert_array_equal(images[:, 0], src_x)
        np.testing.assert_array_equal(labels, src_y)
        np.testing.assert_array_equal(index, np.arange(700))
    m.verify()


@needs_fashion
def test_validation_split_is_a_fixed_disjoint_part_of_the_training_images(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run_prepare(["--dataset", "fashion-mnist", "--out", str(out), "--limit", "700", "--val", "60",
                            "--shard-size", "256"])[0] == 0
    m = Manifest.load(outs[0])
    assert (m.num_samples("train"), m.num_samples("val"), m.num_samples("test")) == (640, 60, 700)
    train_x, train_y, _ = load_arrays(outs[0], "train")
    val_x, val_y, val_i = load_arrays(outs[0], "val")
    np.testing.assert_array_equal(val_i, np.arange(60))  # indexed within its split, like every split
    # Together they are exactly the first 700 source images, each once, order kept within each part.
    src_x = read_idx(FASHION / "train-images-idx3-ubyte.gz")[:700]
    src_y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")[:700]
    pos = {img.tobytes(): i for i, img in enumerate(src_x)}
    val_pos = [pos[img.tobytes()] for img in val_x[:, 0]]
    train_pos = [pos[img.tobytes()] for img in train_x[:, 0]]
    assert sorted(val_pos + train_pos) == list(range(700)) and val_pos == sorted(val_pos)
    np.testing.assert_array_equal(val_y, src_y[val_pos])
    assert val_pos != list(range(60))  # a random choice, not the first images
    # The same choice on every preparation.
    np.testing.assert_array_equal(load_arrays(outs[1], "val")[0], val_x)
    # --limit alone holds nothing out; a negative --val is refused.
    assert run_prepare(["--dataset", "fashion-mnist", "--out", str(tmp_path / "c"), "--limit", "100"])[0] == 0
    assert sorted(Manifest.load(tmp_path / "c").splits()) == ["test", "train"]
    assert run_prepare(["--dataset", "fashion-mnist", "--out", str(tmp_path / "d"), "--val", "-1"])[0] == 2


@needs_fashion
@pytest.mark.slow
def test_fashion_mnist_full_prepare_counts(tmp_path):
    out = tmp_path / "fm"
    assert run_prepare(["--dataset", "fashion-mnist", "--out", str(out)])[0] == 0
    m = Manifest.load(out)
    # 5,000 training images are held out as the validation split.
    assert m.num_samples("train") == 55000 and m.num_samples("val") == 5000 and m.num_samples("test") == 10000
    assert len(m.shards("train")) == 110 and len(m.shards("val")) == 10 and len(m.shards("test")) == 20
    m.verify()
    images, labels, _ = load_arrays(out, "test")
    np.testing.assert_array_equal(images[:, 0], read_idx(FASHION / "t10k-images-idx3-ubyte.gz"))
    assert np.bincount(labels).tolist() == [1000] * 10


@pytest.mark.parametrize("packed", [False, True], ids=["dir", "tar.gz"])
def test_cifar10_round_trip(tmp_path, packed):
    src = tmp_path / "cifar-10-batches-py"
    truth = make_cifar_dir(src, per_batch=7)
    if packed:
        tar_gz_of(src, tmp_path / "cifar-10-python.tar.gz")
        src = tmp_path / "cifar-10-python.tar.gz"
    out = tmp_path / "c10"
    assert run_prepare(["--dataset", "cifar10", "--source", str(src), "--out", str(out),
                        "--shard-size", "8"])[0] == 0
    m = Manifest.load(out)
    assert m.image_shape == (3, 32, 32) and m.class_names[0] == "airplane" and m.n_classes == 10
    for split in ("train", "test"):
        images, labels, _ = load_arrays(out, split)
        np.testing.assert_array_equal(images.transpose(0, 2, 3, 1), truth[split][0])
        np.testing.assert_array_equal(labels, truth[split][1])
    assert m.num_samples("train") == 35 and m.num_samples("test") == 7


def test_cifar_reader_matches_the_documented_layout(tmp_path):
    # Row layout: 1024 red, then 1024 green, then 1024 blue, each 32x32 row-major.
    d = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]}
    d[b"data"][0, 1024 + 32 * 2 + 5] = 200  # green channel, row 2, column 5
    x, y = sources._decode_batch(pickle.dumps(d, protocol=2), "b")
    assert x.shape == (1, 32, 32, 3) and x[0, 2, 5, 1] == 200 and x.sum() == 200 and y.tolist() == [3]


def test_prepare_is_byte_identical(tmp_path):
    make_idx_dir(tmp_path / "src", 90, 30)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert run_prepare(["--dataset", "mnist", "--source", str(tmp_path / "src"), "--out", str(out),
                            "--shard-size", "25"])[0] == 0
        outs.append(out)
    files = _only_entries(outs[0])
    assert files == _only_entries(outs[1]) and len(files) == 4 + 2 + 1
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_multimnist_pairs(tmp_path):
    labels = np.arange(50) % 10
    # Each "digit" is a solid 28x28 square whose grey level encodes its class: the pair's image
    # then shows exactly two shifted squares, added and clipped at 255 where they overlap (all of
    # them ink: at least sources.OVERLAP_INK).
    images = np.repeat((70 + 15 * labels).astype(np.uint8)[:, None, None], 28, 1).repeat(28, 2)
    x, y = sources.synth_multimnist(images, labels, pairs=3, seed=5)
    assert x.shape == (150, 36, 36) and y.shape == (150, 2)
    assert (y[:, 0] != y[:, 1]).all() and (y[:, 0] == np.repeat(labels, 3)).all()
    for img, (a, b) in zip(x, y):
        va, vb = 70 + 15 * a, 70 + 15 * b
        both = min(va + vb, 255)  # the overlap: the sum, clipped (pixel-wise max would give max(va, vb))
        assert set(np.unique(img)) <= {0, va, vb, both}
        assert (img == both).sum() > 0  # shifts of at most 4 px: 28 px squares always overlap
        assert (img == va).sum() + (img == both).sum() == 28 * 28  # each square whole
        assert (img == vb).sum() + (img == both).sum() == 28 * 28
        ys, xs = np.nonzero(img)
        assert 28 <= np.ptp(ys) + 1 <= 36 and 28 <= np.ptp(xs) + 1 <= 36  # shifts of at most 4 each
    x2, y2, share = sources.synth_multimnist(images, labels, pairs=3, seed=5, overlap=True)
    np.testing.assert_array_equal(x, x2)  # asking for the overlap changes nothing else
    # the squares' ink overlaps exactly where the sum shows: the share of the (equal) squares
    for img, (a, b), got in zip(x, y, share):
        assert got == (img == min(140 + 15 * (a + b), 255)).sum() / (28 * 28)
    x3, _ = sources.synth_multimnist(images, labels, pairs=3, seed=6)
    assert not np.array_equal(x, x3)


def test_multimnist_prepare_multi_hot(tmp_path):
    make_idx_dir(tmp_path / "src", 40, 20)
    out = tmp_path / "mm"
    assert run_prepare(["--dataset", "multimnist", "--source", str(tmp_path / "src"), "--out", str(out),
                        "--pairs", "2", "--shard-size", "10", "--seed", "3"])[0] == 0
    m = Manifest.load(out)
    assert m.image_shape == (1, 36, 36) and m.multi_label and m.num_samples("train") == 80
    assert m.class_names == sources.DIGIT_CLASSES
    images, labels, _ = load_arrays(out, "train")
    assert labels.shape == (80, 2) and (labels[:, 0] != labels[:, 1]).all()
    assert m.num_samples("test") == 20  # --test-pairs defaults to one pair per test digit


# ---------------------------------------------------------------- bad input
def _bad_idx_magic(src):
    p = src / "train-images-idx3-ubyte.gz"
    write_idx(p, np.zeros((3, 28, 28), np.uint8), magic_dtype=0x0D)
    return "train-images-idx3-ubyte.gz: not an IDX file"


def _truncated_idx(src):
    p = src / "train-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    return "train-labels-idx1-ubyte: IDX body holds"


def _missing_idx(src):
    (src / "t10k-images-idx3-ubyte.gz").unlink()
    return "missing t10k-images-idx3-ubyte"


@pytest.mark.parametrize("breaker", [_bad_idx_magic, _truncated_idx, _missing_idx])
def test_bad_idx_input_fails_cleanly(tmp_path, capsys, breaker):
    src = tmp_path / "src"
    make_idx_dir(src, 30, 10)
    expected = breaker(src)
    out = tmp_path / "out"
    rc, err = run_prepare(["--dataset", "mnist", "--source", str(src), "--out", str(out)], capsys)
    assert rc == 2 and expected in err
    assert err.startswith("rcn: error: ") and err.count("\n") == 1
    assert _only_entries(tmp_path) == ["src"]  # no output, no partial directory


def test_missing_source_directory(tmp_path, capsys):
    rc, err = run_prepare(["--dataset", "mnist", "--source", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "out")], capsys)
    assert rc == 2 and "nope: no such directory" in err and _only_entries(tmp_path) == []


def _cifar_missing_key(src):
    d = pickle.loads((src / "data_batch_3").read_bytes(), encoding="bytes")
    del d[b"labels"]
    (src / "data_batch_3").write_bytes(pickle.dumps(d, protocol=2))
    return "data_batch_3: CIFAR-10 batch is missing key 'labels'"


def _cifar_missing_file(src):
    (src / "batches.meta").unlink()
    return "missing CIFAR-10 file(s) batches.meta"


def _cifar_not_a_pickle(src):
    (src / "test_batch").write_bytes(b"garbage, not a pickle")
    return "test_batch: not a valid CIFAR-10 batch pickle"


def _cifar_float_array(src):
    d = pickle.loads((src / "data_batch_1").read_bytes(), encoding="bytes")
    d[b"data"] = d[b"data"].astype(np.float32)
    (src / "data_batch_1").write_bytes(pickle.dumps(d, protocol=2))
    return "only uint8 arrays are admitted"


@pytest.mark.parametrize("breaker", [_cifar_missing_key, _cifar_missing_file, _cifar_not_a_pickle,
                                     _cifar_float_array])
def test_bad_cifar_input_fails_cleanly(tmp_path, capsys, breaker):
    src = tmp_path / "src"
    make_cifar_dir(src, per_batch=2)
    expected = breaker(src)
    rc, err = run_prepare(["--dataset", "cifar10", "--source", str(src), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and expected in err and err.count("\n") == 1
    assert _only_entries(tmp_path) == ["src"]


def test_truncated_cifar_archive(tmp_path, capsys):
    make_cifar_dir(tmp_path / "src", per_batch=40)
    arc = tmp_path / "c.tar.gz"
    tar_gz_of(tmp_path / "src", arc)
    arc.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    rc, err = run_prepare(["--dataset", "cifar10", "--source", str(arc), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "c.tar.gz: " in err and ("truncated" in err or "corrupt" in err)
    assert not (tmp_path / "o").exists()


def test_refuses_to_overwrite_a_different_dataset(tmp_path, capsys):
    make_idx_dir(tmp_path / "src", 30, 10)
    out = tmp_path / "out"
    base = ["--source", str(tmp_path / "src"), "--out", str(out), "--shard-size", "10"]
    assert run_prepare(["--dataset", "mnist", *base], capsys)[0] == 0
    before = json.loads((out / "manifest.json").read_text())
    rc, err = run_prepare(["--dataset", "multimnist", *base], capsys)
    assert rc == 2 and "holds data set 'mnist', not 'multimnist'" in err and "--force" in err
    assert json.loads((out / "manifest.json").read_text()) == before
    assert run_prepare(["--dataset", "mnist", *base, "--limit", "5"], capsys)[0] == 0  # same data set
    assert Manifest.load(out).num_samples("train") == 5
    assert run_prepare(["--dataset", "multimnist", *base, "--force"], capsys)[0] == 0
    assert Manifest.load(out).dataset == "multimnist"
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    rc, err = run_prepare(["--dataset", "mnist", "--source", str(tmp_path / "src"), "--out", str(stray)], capsys)
    assert rc == 2 and "not a prepared data set" in err and (stray / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_prepare_cli_one_line_error(tmp_path):
    from _datautil import rcn_cli

    r = rcn_cli("prepare", "--dataset", "cifar10", "--source", str(tmp_path / "none"), "--out",
                str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("rcn: error: ") and "none: no such CIFAR-10 directory" in r.stderr


def test_idx_reader_errors_name_the_file(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3)
    with pytest.raises(DataError, match="x-idx3-ubyte: IDX body holds 0 bytes.*truncated"):
        read_idx(p)
    assert os.path.exists(p)


def test_python2_pickled_batch_as_published(tmp_path):
    rows = np.random.default_rng(1).integers(0, 256, size=(4, 3072), dtype=np.uint8)
    raw = py2_cifar_pickle(rows, [1, 0, 9, 3])
    x, y = sources._decode_batch(raw, "data_batch_1")
    np.testing.assert_array_equal(x, rows.reshape(4, 3, 32, 32).transpose(0, 2, 3, 1))
    assert y.tolist() == [1, 0, 9, 3]
