"""Loader throughput, for `rcn bench --workload loader` and docs/data.md."""

from __future__ import annotations

import time
from pathlib import Path

from rcn_dist.data.loader import TrainStream


def loader_throughput(data_dir: str | Path, batch_size: int, num_workers: int, seconds: float,
                      binarize: str = "dynamic") -> dict[str, float]:
    """Samples/s of one rank's TrainStream over `seconds` (after a first batch, which pays for
    starting the workers; that start-up is reported apart as startup_s)."""
    stream = TrainStream(data_dir, batch_size, dp_rank=0, dp_size=1, seed=0,
                         num_workers=num_workers, binarize=binarize)
    it = iter(stream)
    t0 = time.perf_counter()
    next(it)
    t1 = time.perf_counter()
    samples = 0
    while time.perf_counter() - t1 < seconds:
        samples += len(next(it)["index"])
    elapsed = time.perf_counter() - t1
    it.close()
    return {"samples_per_s": samples / elapsed, "batches": samples // batch_size,
            "seconds": elapsed, "startup_s": t1 - t0, "num_workers": num_workers,
            "batch_size": batch_size}
