"""Writing WebDataset tar shards and their manifest (the format: docs/data.md, "Shards").

A sample is `<key>.npy` (uint8 (C, H, W)), `<key>.cls` and, for MultiMNIST, `<key>.cls2`; the key,
the sample's index in its split as "%08d", seeds per-sample noise (and is no member of its own:
each costs a 512-byte header). Identical input gives byte-identical shards (sorted members, mtime 0,
fixed owner and mode, uncompressed).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "rcn-webdataset"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 500
"""Samples per shard. 500 gives 120 training shards for (Fashion-)MNIST and 100 for CIFAR-10:
enough for e.g. 8 data-parallel ranks x 4 workers, or 30 ranks x 4 with MNIST, and small enough
that the unequal-split remainder an epoch leaves out stays a small fraction (docs/data.md)."""


@lru_cache(maxsize=8)
def npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy header of a C-order uint8 array of `shape` (the same for every image of a data set)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(shape, np.uint8), allow_pickle=False)
    return buf.getvalue()[: -int(np.prod(shape))]


def to_chw(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, C, H, W)."""
    return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)


def write_split(out_dir: Path, split: str, images: np.ndarray, labels: np.ndarray, shard_size: int,
                advance: Callable[[int], Any]) -> dict[str, Any]:
    """Write one split, images (N, C, H, W) uint8 and labels (N,) or (N, 2) int, as
    `<split>-NNNNNN.tar` shards; return its manifest entry. `advance(k)`: k more samples written."""
    import webdataset as wds  # here: it imports torch, which a failed `rcn prepare` need not wait for

    shards = []
    n = len(images)
    header = npy_header(images.shape[1:])
    for s, start in enumerate(range(0, n, shard_size)):
        name = f"{split}-{s:06d}.tar"
        stop = min(start + shard_size, n)
        buf = io.BytesIO()
        with wds.TarWriter(buf, user="rcn", group="rcn", mode=0o444, mtime=0, encoder=False) as tw:
            for i in range(start, stop):
                sample = {"__key__": f"{i:08d}", "npy": header + images[i].tobytes()}
                for member, lab in zip(("cls", "cls2"), np.atleast_1d(labels[i])):
                    sample[member] = str(int(lab)).encode()
                tw.write(sample)
        data = buf.getvalue()
        (out_dir / name).write_bytes(data)
        shards.append({"file": name, "samples": stop - start, "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        advance(stop - start)
    return {"num_samples": n, "shards": shards}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """manifest.json, keys sorted so that it too is identical for identical input."""
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
