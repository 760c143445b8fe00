"""The streaming loader: splitting by rank and worker, equal batch counts, seeded order, exact
resume in a new process, evaluation coverage, and errors at read time."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from _datautil import make_idx_dir, run_prepare

from rcn_dist.data.loader import EvalStream, Manifest, TrainStream, binarize, load_arrays
from rcn_dist.errors import DataError

pytestmark = pytest.mark.filterwarnings("error::ResourceWarning")


def _prepare(tmp_path_factory, name: str, n_train: int, n_test: int, shard: int) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp(name)
    src = make_idx_dir(root / "src", n_train, n_test, seed=n_train)
    assert run_prepare(["--dataset", "mnist", "--source", str(root / "src"), "--out", str(root / "d"),
                        "--shard-size", str(shard)])[0] == 0
    return root / "d", src


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    """480 training samples in 12 shards of 40: divides evenly over 2 ranks x 2 workers x B=10."""
    return _prepare(tmp_path_factory, "even", 480, 110, 40)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """530 training samples in 14 shards (13 of 40, 1 of 10): does not divide over 3 ranks."""
    return _prepare(tmp_path_factory, "uneven", 530, 110, 40)


def _epoch(stream: TrainStream) -> list[dict]:
    it = iter(stream)
    out = [next(it) for _ in range(stream.batches_per_epoch)]
    it.close()
    return out


def _indices(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def test_two_ranks_two_workers_cover_the_split_once(even):
    data, src = even
    per_rank = [_epoch(TrainStream(data, 10, r, 2, seed=1, num_workers=2, binarize="none")) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 24
    seen = _indices(per_rank[0]) + _indices(per_rank[1])
    assert sorted(seen) == list(range(480))
    assert not set(_indices(per_rank[0])) & set(_indices(per_rank[1]))
    images, labels = src["train"]
    for b in per_rank[0] + per_rank[1]:  # the data behind each index is intact
        idx = b["index"].numpy()
        assert b["image"].shape == (10, 1, 28, 28) and b["image"].dtype == torch.float32
        np.testing.assert_array_equal((b["image"][:, 0] * 255).round().numpy().astype(np.uint8), images[idx])
        np.testing.assert_array_equal(b["label"].numpy(), labels[idx])


def test_three_ranks_uneven_shards_give_equal_batch_counts(uneven):
    data, _ = uneven
    for workers in (0, 2):
        streams = [TrainStream(data, 10, r, 3, seed=2, num_workers=workers) for r in range(3)]
        w = max(1, workers)
        # 14 shards over 3 * w slots: every slot is sure of the 14 // (3w) smallest shards.
        smallest = sorted([40] * 13 + [10])[: 14 // (3 * w)]
        assert {s.batches_per_epoch for s in streams} == {w * (sum(smallest) // 10)}
        for epoch in range(2):
            batches = [[next(iter_) for _ in range(s.batches_per_epoch)]
                       for s, iter_ in ((s, iter(s)) for s in streams)]
            seen = Counter(i for bs in batches for i in _indices(bs))
            assert max(seen.values()) == 1  # nothing repeats
            assert len(seen) == streams[0].samples_per_epoch <= 530
            for s in streams:
                s.load_state_dict({"epoch": epoch + 1, "batch": 0})


def test_order_depends_on_seed_and_epoch_only(even):
    data, _ = even
    a = TrainStream(data, 10, 1, 2, seed=7, num_workers=2)
    b = TrainStream(data, 10, 1, 2, seed=7, num_workers=2)
    it_a, it_b = iter(a), iter(b)
    first = [next(it_a) for _ in range(a.batches_per_epoch)]
    again = [next(it_b) for _ in range(b.batches_per_epoch)]
    assert _indices(first) == _indices(again)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(first, again))
    second = [next(it_a) for _ in range(a.batches_per_epoch)]
    assert a.epoch == 1 and _indices(second) != _indices(first)
    assert len(set(_indices(second))) == 240  # a new share of shards for this rank, each sample once
    other_seed = _indices(_epoch(TrainStream(data, 10, 1, 2, seed=8, num_workers=2)))
    assert other_seed != _indices(first)
    it_a.close()
    it_b.close()


def test_dynamic_binarisation_is_layout_independent(even):
    data, src = even
    one = {i: img for b in _epoch(TrainStream(data, 16, 0, 1, seed=3)) for i, img in
           zip(b["index"].tolist(), b["image"])}
    two = [b for r in range(2) for b in _epoch(TrainStream(data, 10, r, 2, seed=3, num_workers=2))]
    assert len(one) == 480
    for b in two:
        for i, img in zip(b["index"].tolist(), b["image"]):
            assert torch.equal(img, one[i])
    # The draws follow the grey levels: mean of the binarised split ~ mean intensity.
    stack = torch.stack(list(one.values()))
    assert set(stack.unique().tolist()) == {0.0, 1.0}
    assert abs(stack.mean().item() - src["train"][0].mean() / 255) < 0.01
    # A new epoch draws afresh.
    later = TrainStream(data, 16, 0, 1, seed=3)
    later.load_state_dict({"epoch": 1, "batch": 0})
    b = next(iter(later))
    assert not torch.equal(b["image"][0], one[b["index"][0].item()])


def test_fixed_binarisation_threshold():
    x = np.array([[[[0, 127, 128, 255]]]], np.uint8)
    assert binarize(x, "fixed").flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert binarize(x, "none").flatten().tolist() == pytest.approx([0, 127 / 255, 128 / 255, 1])


_RESUME = textwrap.dedent("""
    import hashlib, json, sys
    from rcn_dist.data.loader import TrainStream
    data, states = sys.argv[1], json.loads(sys.argv[2])
    out = []
    for rank, state in states:
        s = TrainStream(data, 10, rank, 2, seed=11, num_workers=2)
        s.load_state_dict(state)
        it = iter(s)
        rest = [next(it) for _ in range(2 * s.batches_per_epoch - state["batch"])]
        it.close()
        out.append([[b["index"].tolist(), hashlib.sha256(b["image"].numpy().tobytes()).hexdigest()]
                    for b in rest])
    print(json.dumps(out))
""")


def _digest(batches):
    return [[b["index"].tolist(), hashlib.sha256(b["image"].numpy().tobytes()).hexdigest()] for b in batches]


@pytest.mark.slow
def test_resume_in_a_new_process_gives_the_remaining_batches(even):
    data, _ = even
    states, expected = [], []
    for rank in range(2):
        s = TrainStream(data, 10, rank, 2, seed=11, num_workers=2)
        it = iter(s)
        full = [next(it) for _ in range(2 * s.batches_per_epoch)]  # two uninterrupted epochs
        it.close()
        for k in (5, 8):  # odd k: the round-robin must restart at worker 1
            s2 = TrainStream(data, 10, rank, 2, seed=11, num_workers=2)
            it2 = iter(s2)
            head = [next(it2) for _ in range(k)]
            it2.close()
            assert _digest(head) == _digest(full[:k])
            state = json.loads(json.dumps(s2.state_dict()))
            assert state["epoch"] == 0 and state["batch"] == k
            states.append([rank, state])
            expected.append(_digest(full[k:]))
    r = subprocess.run([sys.executable, "-c", _RESUME, str(data), json.dumps(states)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == expected


def test_resume_across_an_epoch_boundary_without_workers(even):
    data, _ = even
    s = TrainStream(data, 10, 0, 2, seed=4)
    it = iter(s)
    full = [next(it) for _ in range(3 * s.batches_per_epoch)]
    it.close()
    k = s.batches_per_epoch + 3
    r = TrainStream(data, 10, 0, 2, seed=4)
    r.load_state_dict({"epoch": 1, "batch": 3})
    it = iter(r)
    assert _digest([next(it) for _ in range(len(full) - k)]) == _digest(full[k:])
    it.close()
    with pytest.raises(DataError, match="saved with batch_size=10, this run has 20"):
        TrainStream(data, 20, 0, 2, seed=4).load_state_dict(s.state_dict())


def test_too_few_shards_for_ranks_and_workers(even):
    data, _ = even
    with pytest.raises(DataError, match=r"12 train shards for 4 ranks x 4 workers; need at least 16"):
        TrainStream(data, 10, 0, 4, seed=0, num_workers=4)


def test_eval_stream_covers_the_test_split_once_over_three_ranks(even):
    data, src = even
    streams = [EvalStream(data, 16, r, 3) for r in range(3)]
    lens = {len(s) for s in streams}
    assert len(lens) == 1
    seen, padding = [], 0
    for s in streams:
        batches = list(s)
        assert len(batches) == len(s)
        for b in batches:
            assert b["image"].shape == (16, 1, 28, 28) and b["mask"].dtype == torch.bool
            real = b["index"][b["mask"]]
            seen += real.tolist()
            padding += int((~b["mask"]).sum())
            assert (b["index"][~b["mask"]] == -1).all() and (b["image"][~b["mask"]] == 0).all()
            np.testing.assert_array_equal(b["label"][b["mask"]].numpy(), src["test"][1][real.numpy()])
            ref = (src["test"][0][real.numpy()] >= 128).astype(np.float32)
            np.testing.assert_array_equal(b["image"][b["mask"]][:, 0].numpy(), ref)
    assert sorted(seen) == list(range(110))
    assert padding == 3 * 16 * lens.pop() - 110


def test_eval_stream_with_more_ranks_than_shards(even):
    data, _ = even
    streams = [EvalStream(data, 64, r, 5) for r in range(5)]  # 3 test shards, 5 ranks
    assert {len(s) for s in streams} == {1}
    masks = [next(iter(s))["mask"] for s in streams]
    assert sum(int(m.sum()) for m in masks) == 110 and int(masks[4].sum()) == 0


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match=r"no manifest.json \(run `rcn prepare`\)"):
        Manifest.load(tmp_path)


def _copy(data: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in data.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_checksum_mismatch_names_the_shard(even, tmp_path):
    data = _copy(even[0], tmp_path / "d")
    shard = data / "train-000003.tar"
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-000003.tar: shard checksum does not match"):
        Manifest.load(data).verify()


def test_truncated_shard_at_read_time(even, tmp_path):
    data = _copy(even[0], tmp_path / "d")
    shard = data / "train-000005.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"train-000005.tar: shard holds 5000 bytes.*\(truncated\)"):
        _epoch(TrainStream(data, 10, 0, 1, seed=0, shuffle=False))
    with pytest.raises(DataError, match=r"^[^\n]*train-000005.tar: shard holds 5000 bytes[^\n]*$"):
        _epoch(TrainStream(data, 10, 1, 2, seed=0, num_workers=2, shuffle=False))  # from a worker


def test_corrupt_tar_with_matching_manifest(even, tmp_path):
    # A shard that was truncated before its checksum was taken: the tar itself must catch it.
    data = _copy(even[0], tmp_path / "d")
    shard = data / "test-000001.tar"
    cut = shard.read_bytes()[:3000]
    shard.write_bytes(cut)
    m = json.loads((data / "manifest.json").read_text())
    entry = m["splits"]["test"]["shards"][1]
    entry["bytes"], entry["sha256"] = len(cut), hashlib.sha256(cut).hexdigest()
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="test-000001.tar: (truncated|shard holds)"):
        list(EvalStream(data, 16, 0, 1))


def test_load_arrays_limit(even):
    images, labels, index = load_arrays(even[0], "train", limit=45)
    assert images.shape == (45, 1, 28, 28) and index.tolist() == list(range(45))
    np.testing.assert_array_equal(images[:, 0], even[1]["train"][0][:45])


_RANK = textwrap.dedent("""
    import json, sys
    from rcn_dist.data.loader import TrainStream
    s = TrainStream(sys.argv[1], 10, int(sys.argv[2]), 2, seed=5, num_workers=2)
    it = iter(s)
    print(json.dumps([next(it)["index"].tolist() for _ in range(s.batches_per_epoch)]))
    it.close()
""")


@pytest.mark.slow
def test_two_real_rank_processes_split_the_epoch(even):
    data, _ = even
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(data), str(r)], stdout=subprocess.PIPE,
                              text=True) for r in range(2)]
    try:
        outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert len(outs[0]) == len(outs[1]) == 24
    assert sorted(i for out in outs for b in out for i in b) == list(range(480))
