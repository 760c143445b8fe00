"""`rcn prepare`: convert a data set into WebDataset shards plus manifest.json.

    rcn prepare --dataset fashion-mnist --out data/fashion-mnist
    rcn prepare --dataset mnist --source ~/mnist [--download] --out data/mnist
    rcn prepare --dataset cifar10 --source cifar-10-python.tar.gz --out data/cifar10
    rcn prepare --dataset multimnist --source ~/mnist --pairs 2 --out data/multimnist

The training images are split once into "train" and a held-out "val" (--val); --out is written
whole or not at all, and never over something else without --force (docs/data.md; `--download`
needs the network, so the tests do not exercise it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rcn_dist import __version__
from rcn_dist.data import shards, sources, urls
from rcn_dist.errors import DataError

DATASETS = ("fashion-mnist", "mnist", "cifar10", "multimnist")
DEFAULT_VAL = 5000
VAL_SEED = 20251129
"""Seed of the validation choice: fixed, so every preparation of a data set holds out the same images."""

MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def download_mnist(directory: Path) -> None:
    """Fetch the MNIST IDX files missing from `directory` and check their MD5 (needs network)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, md5 in MNIST_MD5.items():
        target = directory / name
        if target.is_file():
            continue
        data = urls.Source(MNIST_MIRROR).read(name)  # DataError naming the URL if it cannot be had
        if hashlib.md5(data).hexdigest() != md5:
            raise DataError(f"{MNIST_MIRROR + name}: MD5 mismatch, refusing the download")
        target.write_bytes(data)


def _check_out(out: Path, dataset: str, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if not out.is_dir() or force or not any(out.iterdir()):
        return
    try:
        have = json.loads((out / shards.MANIFEST).read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        raise DataError(f"{out}: exists and is not a prepared data set; refusing to overwrite it "
                        "(use --force)") from None
    if have != dataset:
        raise DataError(f"{out}: holds data set {have!r}, not {dataset!r}; refusing to overwrite it "
                        "(use --force)")


def _load(args: argparse.Namespace) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str], dict]:
    """{split: (images (N, C, H, W) uint8, labels)}, class names, extra manifest fields."""
    extra: dict[str, Any] = {}
    if args.dataset == "cifar10":
        if not args.source:
            raise DataError("--dataset cifar10 needs --source (the batch directory or the .tar.gz)")
        raw = sources.read_cifar10(args.source)
        names = raw["train"][2]
        data = {s: raw[s][:2] for s in sources.SPLITS}
    elif args.dataset == "mnist" and not args.source:
        raise DataError("--dataset mnist needs --source DIR (add --download to fetch it there)")
    else:
        base = args.dataset if args.dataset != "multimnist" else (
            args.base or ("mnist" if args.source else "fashion-mnist"))
        names = sources.FASHION_CLASSES if base == "fashion-mnist" else sources.DIGIT_CLASSES
        data = {}
        for i, split in enumerate(sources.SPLITS):
            x, y, _ = sources.read_idx_split(args.source or sources.FASHION_MNIST_DIR, split, names)
            if args.dataset == "multimnist":
                pairs = args.pairs if split == "train" else args.test_pairs
                x, y = sources.synth_multimnist(x, y, pairs, seed=args.seed * 2 + i, limit=args.limit)
                extra = {"pairs_per_image": args.pairs, "test_pairs_per_image": args.test_pairs,
                         "base": base, "merge": "add, clip at 255"}
            data[split] = (x, y)
    data = {s: (x[: args.limit], y[: args.limit]) for s, (x, y) in data.items()}  # limit None: all
    # By default DEFAULT_VAL images where that is at most a tenth of the training set (the real
    # MNIST, Fashion-MNIST, CIFAR-10 and MultiMNIST), else none (small or --limit'ed sets).
    n_val = DEFAULT_VAL if len(data["train"][0]) >= 10 * DEFAULT_VAL else 0
    data = hold_out_val(data, n_val if args.val is None else args.val)
    return {s: (shards.to_chw(x), y) for s, (x, y) in data.items()}, names, extra


def hold_out_val(data: dict[str, tuple[np.ndarray, np.ndarray]], n_val: int
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Move min(n_val, N // 10) training images, a fixed random choice, into a "val" split; both
    parts keep the images' original order, "test" is untouched."""
    x, y = data["train"]
    n = min(max(n_val, 0), len(x) // 10)
    if n == 0:
        return data
    chosen = np.zeros(len(x), dtype=bool)
    chosen[np.random.default_rng(VAL_SEED).permutation(len(x))[:n]] = True
    return {**data, "train": (x[~chosen], y[~chosen]), "val": (x[chosen], y[chosen])}


def prepare(args: argparse.Namespace) -> Path:
    """Do the work of `rcn prepare`; returns the output directory."""
    for flag, value, least in (("--shard-size", args.shard_size, 1), ("--limit", args.limit, 1),
                               ("--val", args.val, 0), ("--pairs", args.pairs, 1)):
        if value is not None and value < least:
            raise DataError(f"{flag} must be {'positive' if least else '>= 0'}, got {value}")
    out = Path(args.out)
    _check_out(out, args.dataset, args.force)
    if args.download:
        if args.dataset != "mnist" or not args.source:
            raise DataError("--download is for --dataset mnist with --source DIR")
        download_mnist(Path(args.source))
    data, names, extra = _load(args)
    manifest: dict[str, Any] = {
        "format": shards.FORMAT, "format_version": shards.FORMAT_VERSION, "dataset": args.dataset,
        "tool_version": __version__, "seed": args.seed, "limit": args.limit, "dtype": "uint8",
        "image_shape": [int(v) for v in data["train"][0].shape[1:]], "class_names": list(names),
        "label_kind": "multi" if data["train"][1].ndim == 2 else "single", "splits": {}, **extra,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    console = Console(stderr=True)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, transient=True,
                      disable=not console.is_terminal) as progress:
            for split, (x, y) in data.items():
                task = progress.add_task(f"{args.dataset} {split}", total=len(x))
                manifest["splits"][split] = shards.write_split(
                    tmp, split, x, y, args.shard_size, advance=lambda k, t=task: progress.advance(t, k))
        shards.write_manifest(tmp, manifest)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for split, entry in manifest["splits"].items():
        print(f"{args.dataset} {split}: {entry['num_samples']} samples in {len(entry['shards'])} shards")
    print(f"wrote {out}/{shards.MANIFEST}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rcn prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--source", help="IDX directory, CIFAR-10 batch directory or .tar.gz "
                   f"(fashion-mnist and multimnist default to {sources.FASHION_MNIST_DIR})")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--shard-size", type=int, default=shards.DEFAULT_SHARD_SIZE,
                   help=f"samples per shard (default {shards.DEFAULT_SHARD_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the MultiMNIST synthesis (recorded)")
    p.add_argument("--limit", type=int, help="keep only the first N samples of each split")
    p.add_argument("--pairs", type=int, default=10,
                   help="multimnist: pairs per training digit (default 10: 600,000 training pairs from "
                   "MNIST's 60,000, a hundredth of Sabour et al.'s 1,000 per digit)")
    p.add_argument("--test-pairs", type=int, default=1,
                   help="multimnist: pairs per test digit (default 1: 10,000 test pairs)")
    p.add_argument("--base", choices=("mnist", "fashion-mnist"),
                   help="multimnist: class names of the IDX source (default: fashion-mnist without "
                   "--source, mnist with it)")
    p.add_argument("--val", type=int, default=None,
                   help=f"training images held out as the validation split (default {DEFAULT_VAL} where the "
                   f"training set holds at least {10 * DEFAULT_VAL}, else none; at most a tenth; 0: none)")
    p.add_argument("--download", action="store_true", help="mnist: fetch the IDX files into --source first")
    p.add_argument("--force", action="store_true", help="replace --out even if it holds something else")
    prepare(p.parse_args(argv))
    return 0
