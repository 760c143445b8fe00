"""Reader for the IDX format of MNIST and Fashion-MNIST (plain or gzip-compressed)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from rcn_dist.errors import DataError


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file as images (N, H, W) or labels (N,), uint8; a wrong magic number or a body of
    another size than its header says raises DataError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such IDX file")
    try:
        raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{p}: cannot read ({e})") from None
    # IDX magic: 0x00 0x00 <dtype code> <number of dimensions>; MNIST uses unsigned bytes (0x08) only.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or not 1 <= raw[3] <= 3:
        raise DataError(f"{p}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    need = int(np.prod(shape))
    body = len(raw) - header
    if body != need:
        raise DataError(f"{p}: IDX body holds {body} bytes, its header says {need} for shape {shape}"
                        + (" (truncated)" if body < need else ""))
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx(directory: str | Path, split: str) -> tuple[Path, Path]:
    """The (images, labels) IDX files of a split ("train" or "test") in a directory, gzipped or not."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: no such directory")
    stem = "train" if split == "train" else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        hits = [c for c in (d / f"{stem}-{kind}", d / f"{stem}-{kind}.gz") if c.is_file()]
        if not hits:
            raise DataError(f"{d}: missing {stem}-{kind}[.gz]")
        found.append(hits[0])
    return found[0], found[1]
