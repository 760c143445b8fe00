"""Helpers for the data tests: small sources in the real formats, and `rcn prepare` runs."""

from __future__ import annotations

import gzip
import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from rcn_dist.cli import run_main
from rcn_dist.data import prepare

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, arr: np.ndarray, magic_dtype: int = 0x08) -> None:
    """An IDX file (gzipped if the name ends in .gz) holding a uint8 array."""
    header = bytes([0, 0, magic_dtype, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def make_idx_dir(directory: Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, tuple]:
    """A small MNIST-format directory with random images and labels 0..9 (every class present)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        write_idx(directory / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{stem}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_batch(n: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """A batch dict as the CIFAR-10 python version holds it; also the images (N, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    d = {b"batch_label": b"training batch", b"labels": labels, b"data": rows,
         b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}
    return d, rows.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels)


def make_cifar_dir(directory: Path, per_batch: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """data_batch_1..5, test_batch, batches.meta pickled with protocol 2, as CIFAR-10 ships them."""
    directory.mkdir(parents=True, exist_ok=True)
    parts = {"train": [], "test": []}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        d, x, y = cifar_batch(per_batch, seed=i)
        (directory / name).write_bytes(pickle.dumps(d, protocol=2))
        parts["test" if name == "test_batch" else "train"].append((x, y))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR_NAMES],
            b"num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {s: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v])) for s, v in parts.items()}


def tar_gz_of(directory: Path, archive: Path, top: str = "cifar-10-batches-py") -> None:
    """Pack a directory's files as `top/<file>` into a .tar.gz, like the CIFAR-10 download."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(directory, arcname=top)


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
               linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def run_prepare(argv: list[str], capsys=None) -> tuple[int, str]:
    """`rcn prepare argv` in this process, as the CLI runs it: (exit code, stderr)."""
    rc = run_main(prepare.main, argv)
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def rcn_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `rcn` command in a subprocess."""
    return subprocess.run([sys.executable, "-c", "from rcn_dist.cli import entry; entry()", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def py2_cifar_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as Python 2's cPickle wrote the published CIFAR-10 files: str opcodes
    (SHORT_BINSTRING / BINSTRING) and numpy 1's `numpy.core.multiarray._reconstruct`."""
    import struct

    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b

    n, width = rows.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + s(b"b")
             + b"\x87R" + b"(K\x01" + b"M" + struct.pack("<H", n) + b"M" + struct.pack("<H", width) + b"\x86"
             + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             + b"\x89" + s(rows.astype(np.uint8).tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"training batch 1 of 5") + s(b"data") + array
            + s(b"labels") + label_list + b"u.")
