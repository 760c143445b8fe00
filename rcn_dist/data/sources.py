"""Source readers. Images are uint8 (N, H, W) for grey data and (N, H, W, C) for colour; labels
are (N,) class ids, or (N, 2) for MultiMNIST (the two classes of each overlapping pair)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from rcn_dist.data import safetar
from rcn_dist.data.idx import find_idx, read_idx
from rcn_dist.errors import DataError, UnsafeFileError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
SPLITS = ("train", "test")

Source = tuple[np.ndarray, np.ndarray, list[str]]


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)
def read_idx_split(directory: str | Path, split: str, class_names: list[str]) -> Source:
    """One split of an IDX directory: images (N, 28, 28) uint8, labels (N,) int64."""
    img_path, lbl_path = find_idx(directory, split)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise DataError(f"{img_path}: expected a 3-d image array, got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{lbl_path}: {labels.shape[0] if labels.ndim else 0} labels for "
                        f"{len(images)} images in {img_path.name}")
    if len(labels) and int(labels.max()) >= len(class_names):
        raise DataError(f"{lbl_path}: label {int(labels.max())} out of range for {len(class_names)} classes")
    return images, labels.astype(np.int64), class_names


# ---------------------------------------------------------------- CIFAR-10 python batches
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
CIFAR_META = "batches.meta"


def _latin1_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes under pickle protocol 2 as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only for (str, 'latin1')")
    return obj.encode("latin1")


def _uint8_dtype(spec: Any, _align: bool = False, _copy: bool = False) -> np.dtype:
    if spec not in ("u1", "|u1", "uint8", "B", b"u1", b"|u1", b"uint8", b"B"):
        raise pickle.UnpicklingError(f"only uint8 arrays are admitted, not dtype {spec!r}")
    # A private copy: the BUILD that follows calls __setstate__ on it, which must never reach the
    # process-wide uint8 dtype.
    return np.dtype("u1", False, True)


# Stands for numpy.ndarray: only _reconstruct accepts it, and it cannot be called.
_NDARRAY = object()


def _reconstruct(cls: Any, _shape: Any, _typecode: Any) -> np.ndarray:
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("only plain numpy arrays are admitted")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


# The complete list of globals a CIFAR-10 batch may name: numpy's array reconstruction (under its
# numpy 1 and numpy 2 module names), restricted to uint8, and the bytes encoder of protocol 2.
_ADMITTED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _uint8_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fileobj: io.BytesIO, name: str) -> None:
        super().__init__(fileobj, encoding="bytes")
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ADMITTED[(module, name)]
        except KeyError:
            raise UnsafeFileError(f"{self.name}: refused to unpickle {module}.{name} "
                                  "(a CIFAR-10 batch holds only dicts, lists, bytes, ints and uint8 arrays)") from None


def safe_unpickle(data: bytes, name: str) -> Any:
    """Unpickle CIFAR-10 batch bytes, admitting only what the format holds: any other global (a
    function, a class) is refused with UnsafeFileError naming `name` before it can be called; a
    file that is not a pickle raises DataError."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), name).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as e:
        raise DataError(f"{name}: not a valid CIFAR-10 batch pickle ({e})") from None


def _fields(data: bytes, name: str, *keys: str) -> list[Any]:
    """The values of `keys` (stored as bytes or str) in the pickled dict of a CIFAR-10 batch file."""
    d = safe_unpickle(data, name)
    if not isinstance(d, dict):
        raise DataError(f"{name}: a CIFAR-10 batch file is a dict, got {type(d).__name__}")
    missing = [k for k in keys if k.encode() not in d and k not in d]
    if missing:
        raise DataError(f"{name}: CIFAR-10 batch is missing key {missing[0]!r} (has {sorted(map(str, d))})")
    return [d[k.encode()] if k.encode() in d else d[k] for k in keys]


def _decode_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _fields(data, name, "data", "labels")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{name}: 'data' must be a uint8 array of shape (N, 3072), got "
                        f"{getattr(x, 'shape', type(x).__name__)}")
    y = np.asarray(y, dtype=np.int64) if isinstance(y, list) and all(isinstance(v, int) for v in y) else None
    if y is None or y.shape != (len(x),) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"{name}: 'labels' must be a list of {len(x)} class ids in 0..9")
    # Rows hold 1024 red, 1024 green, 1024 blue values, each a 32x32 image in row-major order.
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), y


def read_cifar10(source: str | Path) -> dict[str, Source]:
    """CIFAR-10 "python version", the batch directory or the .tar.gz (streamed, never extracted):
    {"train": ..., "test": ...} with images (N, 32, 32, 3) uint8."""
    src = Path(source)
    wanted = [*CIFAR_TRAIN, *CIFAR_TEST, CIFAR_META]
    if src.is_dir():
        files = {n: (src / n).read_bytes() for n in wanted if (src / n).is_file()}
    elif src.is_file():
        with open(src, "rb") as f:  # iter_files turns a corrupt archive, gzip layer too, into DataError
            files = {base: data for member, data in safetar.iter_files(f, src, mode="r|*")
                     if (base := member.rsplit("/", 1)[-1]) in wanted}
    else:
        raise DataError(f"{src}: no such CIFAR-10 directory or archive")
    missing = [n for n in wanted if n not in files]
    if missing:
        raise DataError(f"{src}: missing CIFAR-10 file(s) {', '.join(missing)}")
    (names,) = _fields(files[CIFAR_META], f"{src}/{CIFAR_META}", "label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"{src}/{CIFAR_META}: 'label_names' must be a list of 10 names")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    out = {}
    for split, batches in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
        parts = [_decode_batch(files[b], f"{src}/{b}") for b in batches]
        out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), names)
    return out


# ---------------------------------------------------------------- MultiMNIST (Sabour et al. 2017)
MULTI_SIZE = 36
MULTI_SHIFT = 4
OVERLAP_INK = 64
"""A pixel at least this bright (of 255) is an object's ink, for synth_multimnist's overlap share."""


def synth_multimnist(images: np.ndarray, labels: np.ndarray, pairs: int, seed: int,
                     limit: int | None = None, overlap: bool = False):
    """Overlapping digit pairs as Sabour et al. built MultiMNIST: each 28x28 digit, padded to 36x36
    and shifted by up to 4 pixels each way, is added to a random digit of another class, shifted
    likewise, and the sum clipped at 255 (their released mnist_shift code), `pairs` times. Returns images (M, 36, 36) uint8 and labels
    (M, 2) int64 (the first and second digit's class), M = min(len(images) * pairs, limit);
    deterministic in `seed`. With overlap=True a third array (M,) float64 comes back: the share of
    the smaller object's ink (pixels >= OVERLAP_INK) that the other object's ink covers, 0..1."""
    n = len(images)
    if images.shape[1:] != (28, 28):
        raise DataError(f"MultiMNIST needs 28x28 digits, got {images.shape[1:]}")
    if n == 0 or len(np.unique(labels)) < 2:
        raise DataError("MultiMNIST needs digits of at least two classes")
    m = n * pairs if limit is None else min(n * pairs, limit)
    rng = np.random.default_rng(seed)
    first = np.arange(m) // pairs
    second = rng.integers(0, n, size=m)
    clash = labels[second] == labels[first]
    while clash.any():  # redraw partners of the same class until every pair has two classes
        second[clash] = rng.integers(0, n, size=int(clash.sum()))
        clash = labels[second] == labels[first]
    shifts = rng.integers(-MULTI_SHIFT, MULTI_SHIFT + 1, size=(m, 2, 2))  # (pair, digit, dy/dx)
    out = np.zeros((m, MULTI_SIZE, MULTI_SIZE), np.uint16)  # the sum, clipped to uint8 at the end
    inks = [np.zeros((m, MULTI_SIZE, MULTI_SIZE), bool) for _ in range(2)] if overlap else None
    for digit, src in enumerate((first, second)):
        corner = shifts[:, digit] + (MULTI_SIZE - 28) // 2  # (pair, y/x) of the digit's top left
        # Vectorised per offset: 81 groups instead of one slice assignment per pair.
        for y, x in np.unique(corner, axis=0):
            sel = np.nonzero((corner == (y, x)).all(axis=1))[0]
            out[sel, y:y + 28, x:x + 28] += images[src[sel]]
            if inks is not None:
                inks[digit][sel, y:y + 28, x:x + 28] = images[src[sel]] >= OVERLAP_INK
    merged = np.minimum(out, 255).astype(np.uint8)
    pair_labels = np.stack([labels[first], labels[second]], axis=1).astype(np.int64)
    if inks is None:
        return merged, pair_labels
    both = (inks[0] & inks[1]).sum((1, 2))
    smaller = np.minimum(inks[0].sum((1, 2)), inks[1].sum((1, 2)))
    return merged, pair_labels, both / np.maximum(smaller, 1)
