"""The streaming loader: WebDataset shards -> batches, split by data-parallel rank and worker.

TrainStream's order depends only on (seed, epoch) and the layout, so a resume continues it exactly;
EvalStream reads a split once, every rank the same number of batches (docs/data.md, "The loader").

Batches are dicts: "image" float32 (B, C, H, W) in [0, 1], "grey" (the image before
binarisation), "label" int64 (B,) or float32 multi-hot (B, n_classes), "index" int64 (B,) (the
sample's index in its split; -1 for padding), and for evaluation "mask" bool (B,).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset.tariterators as wds_tar

from rcn_dist.data import safetar
from rcn_dist.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, npy_header
from rcn_dist.data.urls import Source
from rcn_dist.errors import DataError, RcnError, UnsafeFileError
from rcn_dist.files import atomic_write

BINARIZE = ("dynamic", "fixed", "none")
_ERROR = "__rcn_error__"


# ---------------------------------------------------------------- manifest
class Manifest:
    """A prepared data set: manifest.json plus the shards it lists, in a local directory or at a
    URL (rcn_dist.data.urls), optionally cached node-locally in `cache_dir`."""

    def __init__(self, source: Source, data: dict[str, Any], cache_dir: str | Path | None = None) -> None:
        self.source = source
        self.dir: Path | str = source.local_dir or source.base  # the directory, URL prefix or pipe:
        self.data = data
        self.cache_dir = Path(cache_dir) if cache_dir else None

    @classmethod
    def load(cls, directory: str | Path, cache_dir: str | Path | None = None) -> Manifest:
        """Read and check the manifest of `directory` (a directory, URL, pipe: template or brace
        list: see rcn_dist.data.urls); DataError naming what is wrong."""
        src = Source(directory)
        path = src.where(MANIFEST)
        if src.local_dir is not None and not Path(path).is_file():
            raise DataError(f"{src.local_dir}: no {MANIFEST} (run `rcn prepare`)")
        try:
            m = json.loads(src.read(MANIFEST).decode())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise DataError(f"{path}: not an rcn shard manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path}: format version {m.get('format_version')!r}, this tool reads "
                            f"{FORMAT_VERSION} (re-run `rcn prepare`)")
        try:
            shape = [int(v) for v in m["image_shape"]]
            names = [str(v) for v in m["class_names"]]
            for split, entry in m["splits"].items():
                for sh in entry["shards"]:
                    f = sh["file"]
                    # The manifest names files inside its own directory, never elsewhere.
                    if not isinstance(f, str) or "/" in f or "\\" in f or f in ("", ".", ".."):
                        raise DataError(f"{path}: shard file name {f!r} is not a plain file name")
                    src.check_name(f, str(path))  # and for URLs and commands, nothing but [A-Za-z0-9._-]
                    if not (isinstance(sh["samples"], int) and isinstance(sh["bytes"], int)
                            and isinstance(sh["sha256"], str)):
                        raise DataError(f"{path}: shard entry {f!r} needs integer samples and bytes "
                                        "and a sha256 string")
                if sum(sh["samples"] for sh in entry["shards"]) != entry["num_samples"]:
                    raise DataError(f"{path}: split {split!r} shard counts do not add up to num_samples")
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
        if len(shape) != 3 or min(shape) < 1 or len(names) < 2:
            raise DataError(f"{path}: malformed image_shape or class_names")
        if src.shards is not None:
            m = _select(m, src.shards, path)
        return cls(src, m, cache_dir)

    @property
    def dataset(self) -> str:
        return self.data["dataset"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        c, h, w = self.data["image_shape"]
        return int(c), int(h), int(w)

    @property
    def class_names(self) -> list[str]:
        return list(self.data["class_names"])

    @property
    def n_classes(self) -> int:
        return len(self.data["class_names"])

    @property
    def multi_label(self) -> bool:
        """True for MultiMNIST: two classes per image, labels come as multi-hot vectors."""
        return self.data.get("label_kind") == "multi"

    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        """The split's shard entries: file, samples, bytes, sha256."""
        if split not in self.data["splits"]:
            raise DataError(f"{self.dir}: no split {split!r} (has {', '.join(self.splits())})")
        return self.data["splits"][split]["shards"]

    def num_samples(self, split: str) -> int:
        return sum(e["samples"] for e in self.shards(split))  # == num_samples: checked by load

    def read_shard_bytes(self, entry: dict[str, Any]) -> bytes:
        """A shard's bytes, checked against the manifest's size and SHA-256: from the cache when
        it holds a good copy, else from the source (and then into the cache)."""
        cache = self.cache_dir / f"{entry['sha256'][:16]}-{entry['file']}" if self.cache_dir else None
        if cache is not None:
            with contextlib.suppress(OSError):  # absent (or unreadable, or being replaced): fetch it
                data = cache.read_bytes()
                if len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]:
                    return data
        where = self.source.where(entry["file"])
        try:
            data = self.source.read(entry["file"])
        except OSError as e:  # a local file (remote sources raise DataError)
            raise DataError(f"{where}: cannot read shard ({e.strerror or e})") from None
        if len(data) != entry["bytes"]:
            raise DataError(f"{where}: shard holds {len(data)} bytes, the manifest says {entry['bytes']} "
                            + ("(truncated)" if len(data) < entry["bytes"] else "(changed)"))
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DataError(f"{where}: shard checksum does not match the manifest (corrupt or changed)")
        if cache is not None:
            try:  # readers on the node (other ranks, workers) see the whole file or none
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cache, data)
            except OSError as e:
                raise DataError(f"{cache.parent}: cannot write the shard cache ({e.strerror or e})") from None
        return data

    def verify(self) -> None:
        """Check every shard's size and SHA-256; DataError names the first bad shard."""
        for split in self.splits():
            for entry in self.shards(split):
                self.read_shard_bytes(entry)


def _select(m: dict[str, Any], files: list[str], path: Path | str) -> dict[str, Any]:
    """The manifest restricted to the shards of a brace list (splits left without shards dropped)."""
    known = {sh["file"] for entry in m["splits"].values() for sh in entry["shards"]}
    missing = [f for f in files if f not in known]
    if missing:
        raise DataError(f"{path}: lists no shard {missing[0]!r} (of the brace list)")
    m = copy.deepcopy(m)
    for entry in m["splits"].values():
        entry["shards"] = [sh for sh in entry["shards"] if sh["file"] in files]
        entry["num_samples"] = sum(sh["samples"] for sh in entry["shards"])
    m["splits"] = {split: entry for split, entry in m["splits"].items() if entry["shards"]}
    return m


# ---------------------------------------------------------------- reading one shard
def iter_shard(manifest: Manifest, entry: dict[str, Any]) -> Iterator[dict[str, bytes]]:
    """The raw samples of one shard ({"__key__", "npy", "cls", ...}), in stored order, once its size,
    checksum and tar members (safetar: UnsafeFileError) pass; it must hold the manifest's count."""
    path = manifest.source.where(entry["file"])
    data = manifest.read_shard_bytes(entry)
    files = ({"fname": name, "data": content, "__url__": str(path)}
             for name, content in safetar.iter_files(io.BytesIO(data), path))
    n = 0
    try:
        for sample in wds_tar.group_by_keys(files):
            if "npy" not in sample or "cls" not in sample:
                raise DataError(f"{path}: sample {sample['__key__']!r} lacks its npy or cls member")
            n += 1
            yield sample
    except ValueError as e:  # group_by_keys: a duplicate member name
        raise DataError(f"{path}: {e.args[0]}") from None
    if n != entry["samples"]:
        raise DataError(f"{path}: shard holds {n} samples, the manifest says {entry['samples']}")


def _decode(samples: list[dict[str, bytes]], manifest: Manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> images uint8 (B, C, H, W), labels int64 (B,) or (B, 2), indices int64 (B,)."""
    shape = manifest.image_shape
    header = npy_header(shape)
    size = len(header) + int(np.prod(shape))
    images = np.empty((len(samples), *shape), np.uint8)
    multi = manifest.multi_label
    labels = np.empty((len(samples), 2) if multi else (len(samples),), np.int64)
    index = np.empty(len(samples), np.int64)
    for i, s in enumerate(samples):
        try:
            raw = s["npy"]
            if len(raw) == size and raw.startswith(header):  # the header is the same for all
                x = np.frombuffer(raw, np.uint8, offset=len(header)).reshape(shape)
            else:
                x = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
            labels[i] = (int(s["cls"]), int(s["cls2"])) if multi else int(s["cls"])
            index[i] = int(s["__key__"])
        except (ValueError, KeyError, OSError) as e:
            raise DataError(f"{s['__url__']}: sample {s['__key__']!r} does not decode ({e})") from None
        if x.shape != shape or x.dtype != np.uint8:
            raise DataError(f"{s['__url__']}: sample {s['__key__']!r} is {x.dtype} {x.shape}, "
                            f"the manifest says uint8 {shape}")
        images[i] = x
    if labels.size and (labels.min() < 0 or labels.max() >= manifest.n_classes):
        raise DataError(f"{samples[0]['__url__']}: a label is out of range 0..{manifest.n_classes - 1}")
    return images, labels, index


# ---------------------------------------------------------------- binarisation
def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a bijective, well-mixed hash of a 64-bit counter (wraps mod 2^64).
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def binarize(images: np.ndarray, mode: str, seed: int = 0, epoch: int = 0,
             index: np.ndarray | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W) in [0, 1].

    "fixed": 1 where x/255 >= 0.5. "none": x/255. "dynamic": a Bernoulli(x/255) draw per pixel
    from a counter-based hash of (seed, epoch, sample index, pixel), so a sample gets the same
    draw whichever rank, worker or batch it lands in.
    """
    if mode == "none":
        return torch.from_numpy(images.astype(np.float32) / 255.0)
    if mode == "fixed":
        return torch.from_numpy((images >= 128).astype(np.float32))  # 128/255 is the first >= 0.5
    if mode != "dynamic":
        raise DataError(f"unknown binarisation {mode!r} (use {', '.join(BINARIZE)})")
    b = images.shape[0]
    npix = int(np.prod(images.shape[1:]))
    key = _mix64(np.array([(seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)], np.uint64))
    ctr = index.astype(np.uint64)[:, None] * np.uint64(npix) + np.arange(npix, dtype=np.uint64)[None]
    u = _mix64(_mix64(ctr ^ key)) >> np.uint64(40)  # 24 uniform bits, (B, npix)
    # u / 2^24 < x / 255, in exact integer arithmetic.
    bits = u * np.uint64(255) < images.reshape(b, npix).astype(np.uint64) << np.uint64(24)
    return torch.from_numpy(bits.reshape(images.shape).astype(np.float32))


def _batch(samples: list[dict[str, bytes]], manifest: Manifest, mode: str, seed: int, epoch: int) -> dict:
    images, labels, index = _decode(samples, manifest)
    image = binarize(images, mode, seed, epoch, index)
    if manifest.multi_label:  # (B, 2) class ids -> multi-hot (B, n_classes)
        hot = np.zeros((len(labels), manifest.n_classes), np.float32)
        np.put_along_axis(hot, labels, 1.0, axis=1)
        labels = hot
    # "grey": the image before binarisation, for the encoder capsules (data.caps_input).
    return {"image": image, "grey": image if mode == "none" else binarize(images, "none"),
            "index": torch.from_numpy(index), "label": torch.from_numpy(labels)}


def _rng(*parts: int) -> random.Random:
    # random.Random seeded with an int is reproducible across processes and platforms.
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _check_stream(dp_rank: int, dp_size: int, batch_size: int, binarize: str) -> None:
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"data-parallel rank {dp_rank} is outside 0..{dp_size - 1}")
    if batch_size < 1:
        raise DataError("batch_size must be positive")
    if binarize not in BINARIZE:
        raise DataError(f"unknown binarisation {binarize!r} (use {', '.join(BINARIZE)})")


# ---------------------------------------------------------------- training
class _EpochSlots(torch.utils.data.IterableDataset):
    """One epoch of one rank: in each DataLoader worker, the batches of that worker's slot."""

    def __init__(self, stream: TrainStream, epoch: int, skip: int) -> None:
        super().__init__()
        self.s, self.epoch, self.skip = stream, epoch, skip

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        try:
            yield from self.s._slot_batches(self.epoch, (wid + self.skip) % self.s._w, self.skip)
        except RcnError as e:
            if info is None:
                raise
            # The DataLoader would re-raise it wrapped in a multi-line worker traceback; pass the
            # error itself to the main process, which raises it as it was.
            yield {_ERROR: (type(e).__name__, str(e))}


class TrainStream:
    """Endless training batches for one data-parallel rank, `batches_per_epoch` per epoch, in an
    order that depends only on (seed, epoch) and the layout (dp_size, num_workers, batch_size):
    `load_state_dict(state_dict())` continues with exactly the batches that would have followed."""

    def __init__(self, data_dir: str | Path, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 num_workers: int = 0, binarize: str = "dynamic", shuffle: bool = True,
                 split: str = "train", shuffle_buffer: int = 1000,
                 cache_dir: str | Path | None = None, pin_memory: bool = False) -> None:
        """pin_memory: hand out batches in page-locked memory (for a GPU: its copies then run
        asynchronously, overlapping the step)."""
        _check_stream(dp_rank, dp_size, batch_size, binarize)
        if num_workers < 0 or shuffle_buffer < 1:
            raise DataError("shuffle_buffer must be positive, num_workers >= 0")
        self.manifest = Manifest.load(data_dir, cache_dir)
        self.batch_size, self.dp_rank, self.dp_size, self.seed = batch_size, dp_rank, dp_size, seed
        self.num_workers, self.binarize, self.shuffle, self.split = num_workers, binarize, shuffle, split
        self.shuffle_buffer, self.pin_memory = shuffle_buffer, pin_memory
        self._w = max(1, num_workers)
        entries = self.manifest.shards(split)
        slots = dp_size * self._w
        if len(entries) < slots:
            raise DataError(f"{self.manifest.dir}: {len(entries)} {split} shards for {dp_size} ranks x "
                            f"{self._w} workers; need at least {slots} (re-run `rcn prepare` with a "
                            "smaller --shard-size, or use fewer workers)")
        # Every slot holds at least the len//slots smallest shards, whatever the permutation.
        per_slot = sum(sorted(e["samples"] for e in entries)[: len(entries) // slots])
        self.batches_per_slot = per_slot // batch_size
        if self.batches_per_slot == 0:
            raise DataError(f"{self.manifest.dir}: batch size {batch_size} is larger than the "
                            f"{per_slot} samples each of {slots} (rank, worker) slots is sure to get")
        self.epoch, self.batch_in_epoch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank (and every other rank) yields per epoch."""
        return self._w * self.batches_per_slot

    @property
    def samples_per_epoch(self) -> int:
        """Samples all ranks together use per epoch (the rest of the split is left out)."""
        return self.batches_per_epoch * self.batch_size * self.dp_size

    def _slot_samples(self, epoch: int, role: int) -> Iterator[dict[str, bytes]]:
        entries = self.manifest.shards(self.split)
        order = list(range(len(entries)))
        if self.shuffle:
            _rng(self.seed, epoch).shuffle(order)
        mine = order[self.dp_rank + self.dp_size * role :: self.dp_size * self._w]
        samples = (sample for i in mine for sample in iter_shard(self.manifest, entries[i]))
        if not self.shuffle:
            yield from samples
            return
        rng = _rng(self.seed, epoch, self.dp_rank, role, self.dp_size, self._w)
        buf: list[dict[str, bytes]] = []
        for sample in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            j = rng.randrange(len(buf))
            yield buf[j]
            buf[j] = sample
        while buf:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()

    def _slot_batches(self, epoch: int, role: int, skip: int) -> Iterator[dict]:
        """Batches of slot `role` not among the first `skip` batches of the rank's epoch."""
        # Rank batch j comes from role j % W; of the first `skip`, this many were this role's.
        own_skip = skip // self._w + (1 if role < skip % self._w else 0)
        samples = self._slot_samples(epoch, role)
        try:
            for done in range(self.batches_per_slot):
                chunk = list(itertools.islice(samples, self.batch_size))
                if len(chunk) < self.batch_size:
                    raise DataError(f"{self.manifest.dir}: slot ran out of samples after {done} batches "
                                    "(shard counts do not match the manifest)")
                if done >= own_skip:  # skipped batches are read and shuffled but not decoded
                    yield _batch(chunk, self.manifest, self.binarize, self.seed, epoch)
        finally:
            samples.close()

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[dict]:
        if skip >= self.batches_per_epoch:
            return
        ds = _EpochSlots(self, epoch, skip)
        if self.num_workers == 0:
            for batch in ds:
                yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch
            return
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                              pin_memory=self.pin_memory))
        try:
            for batch in it:
                if _ERROR in batch:
                    name, msg = batch[_ERROR]
                    raise {"UnsafeFileError": UnsafeFileError}.get(name, DataError)(msg)
                yield batch
        finally:
            it._shutdown_workers()  # now, not whenever a traceback holding `it` is collected

    def __iter__(self) -> Iterator[dict]:
        while True:
            for batch in self._epoch_batches(self.epoch, self.batch_in_epoch):
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        """The position (epoch, batches consumed in it) and the layout it is valid for."""
        return {"epoch": self.epoch, "batch": self.batch_in_epoch, "seed": self.seed,
                "dp_size": self.dp_size, "num_workers": self._w, "batch_size": self.batch_size,
                "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position. The layout must match: a different seed, batch size,
        rank count or worker count would make a different epoch, not the rest of the saved one."""
        for key in ("seed", "dp_size", "num_workers", "batch_size"):
            have = self.state_dict()[key]
            if key in state and int(state[key]) != have:
                raise DataError(f"loader state was saved with {key}={state[key]}, this run has {have}")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch_in_epoch = epoch, batch


# ---------------------------------------------------------------- evaluation
class EvalStream:
    """One pass over a split, every sample once across all ranks: rank r reads shards r, r + R, ...
    in order, and every rank yields `len(self)` batches, padded with zero images, index -1 and
    "mask" False."""

    def __init__(self, data_dir: str | Path, batch_size: int, dp_rank: int, dp_size: int,
                 split: str = "test", binarize: str = "fixed", seed: int = 0,
                 cache_dir: str | Path | None = None) -> None:
        _check_stream(dp_rank, dp_size, batch_size, binarize)
        self.manifest = Manifest.load(data_dir, cache_dir)
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.split, self.binarize, self.seed = split, binarize, seed
        entries = self.manifest.shards(split)
        self._mine = entries[dp_rank::dp_size]
        longest = max(sum(e["samples"] for e in entries[r::dp_size]) for r in range(dp_size))
        self._len = -(-longest // batch_size)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[dict]:
        samples = (sample for entry in self._mine for sample in iter_shard(self.manifest, entry))
        for _ in range(self._len):
            chunk = list(itertools.islice(samples, self.batch_size))  # short or empty at the end
            pad = (self.batch_size - len(chunk),)
            batch = _batch(chunk, self.manifest, self.binarize, self.seed, 0)
            for k, v in batch.items():  # padded with zeros, index -1
                batch[k] = torch.cat([v, v.new_full(pad + v.shape[1:], -1 if k == "index" else 0)])
            batch["mask"] = torch.arange(self.batch_size) < len(chunk)
            yield batch
        for _ in samples:  # to the end of the last shard, where iter_shard checks its sample count
            pass


def load_arrays(data_dir: str | Path, split: str, limit: int | None = None,
                cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A whole split (or its first `limit` samples) in stored order: images uint8 (N, C, H, W),
    labels int64 (N,) or (N, 2), indices int64 (N,). For nearest-neighbour searches and tests."""
    manifest = Manifest.load(data_dir, cache_dir)
    samples: list[dict[str, bytes]] = []
    for entry in manifest.shards(split):
        if limit is not None and len(samples) >= limit:
            break
        samples.extend(iter_shard(manifest, entry))
    return _decode(samples[:limit], manifest)
