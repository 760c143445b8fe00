"""Untrusted data files cannot run code or escape: CIFAR pickles and tar shards/archives."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from _datautil import add_member, make_cifar_dir, make_idx_dir, run_prepare, tar_gz_of

from rcn_dist.data import safetar
from rcn_dist.data.loader import EvalStream, Manifest, TrainStream
from rcn_dist.data.sources import safe_unpickle
from rcn_dist.errors import DataError, UnsafeFileError

pytestmark = pytest.mark.filterwarnings("error::ResourceWarning")


class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpenPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_SystemPayload, _OpenPayload, _ExecPayload])
def test_malicious_cifar_pickle_is_refused_before_it_runs(tmp_path, capsys, payload):
    src = tmp_path / "src"
    make_cifar_dir(src, per_batch=2)
    marker = tmp_path / "MARKER"
    d = pickle.loads((src / "data_batch_2").read_bytes(), encoding="bytes")
    d[b"batch_label"] = payload(marker)  # hidden inside an otherwise valid batch
    (src / "data_batch_2").write_bytes(pickle.dumps(d, protocol=2))
    rc, err = run_prepare(["--dataset", "cifar10", "--source", str(src), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "data_batch_2: refused to unpickle" in err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_malicious_pickle_inside_the_archive(tmp_path, capsys):
    src = tmp_path / "src"
    make_cifar_dir(src, per_batch=2)
    marker = tmp_path / "MARKER"
    (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": _OpenPayload(marker)}, protocol=2))
    tar_gz_of(src, tmp_path / "c.tar.gz")
    rc, err = run_prepare(["--dataset", "cifar10", "--source", str(tmp_path / "c.tar.gz"), "--out",
                           str(tmp_path / "o")], capsys)
    assert rc == 2 and "c.tar.gz/batches.meta: refused to unpickle io.open" in err
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    marker = tmp_path / "MARKER"
    arr = np.array([_OpenPayload(marker)], dtype=object)
    with pytest.raises((UnsafeFileError, DataError)):
        safe_unpickle(pickle.dumps({b"data": arr, b"labels": [0]}, protocol=2), "x")
    assert not marker.exists()


def test_the_uint8_dtype_is_never_mutated():
    before = np.dtype(np.uint8).str
    d = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [0, 1]}
    out = safe_unpickle(pickle.dumps(d, protocol=2), "x")
    np.testing.assert_array_equal(out[b"data"], d[b"data"])
    assert np.dtype(np.uint8).str == before and out[b"data"].dtype == np.uint8


# ---------------------------------------------------------------- tar members
BAD_MEMBERS = {
    "dotdot": dict(name="../escape.npy", data=b"x"),
    "absolute": dict(name="/tmp/abs.npy", data=b"x"),
    "symlink": dict(name="00000000.npy", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
    "hardlink": dict(name="00000000.cls", kind=tarfile.LNKTYPE, linkname="../../etc/shadow"),
    "device": dict(name="00000000.dev", kind=tarfile.CHRTYPE),
}


def _poison_shard(data_dir, shard_name: str, bad: dict) -> None:
    """Replace a shard by one with a bad member first, and update the manifest to match, as an
    attacker who controls the whole directory would."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, **bad)
        add_member(tar, "00000001.npy", b"not reached")
    raw = buf.getvalue()
    (data_dir / shard_name).write_bytes(raw)
    m = json.loads((data_dir / "manifest.json").read_text())
    for split in m["splits"].values():
        for entry in split["shards"]:
            if entry["file"] == shard_name:
                entry["bytes"], entry["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
    (data_dir / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    make_idx_dir(root / "src", 40, 20)
    assert run_prepare(["--dataset", "mnist", "--source", str(root / "src"), "--out", str(root / "d"),
                        "--shard-size", "10"])[0] == 0
    return root / "d"


@pytest.mark.parametrize("kind", list(BAD_MEMBERS))
def test_bad_tar_members_in_shards_are_refused_at_read_time(prepared, tmp_path, kind):
    data = tmp_path / "d"
    data.mkdir()
    for f in prepared.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    _poison_shard(data, "train-000000.tar", BAD_MEMBERS[kind])
    _poison_shard(data, "test-000001.tar", BAD_MEMBERS[kind])
    Manifest.load(data).verify()  # checksums match: only the member check stands in the way
    with pytest.raises(UnsafeFileError, match=r"train-000000.tar: tar member .* (absolute|escapes|link|device)"):
        next(iter(TrainStream(data, 5, 0, 1, seed=0, shuffle=False)))
    with pytest.raises(UnsafeFileError, match="test-000001.tar"):
        list(EvalStream(data, 5, 0, 1))
    assert not (tmp_path / "escape.npy").exists()


@pytest.mark.parametrize("kind", list(BAD_MEMBERS))
def test_bad_tar_members_in_the_cifar_archive_are_refused(tmp_path, capsys, kind):
    make_cifar_dir(tmp_path / "src", per_batch=2)
    arc = tmp_path / "c.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        add_member(tar, **BAD_MEMBERS[kind])
        tar.add(tmp_path / "src", arcname="cifar-10-batches-py")
    rc, err = run_prepare(["--dataset", "cifar10", "--source", str(arc), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "c.tar.gz: tar member" in err and not (tmp_path / "o").exists()


def test_check_member_accepts_plain_files_and_dirs():
    for info in (tarfile.TarInfo("a/b.npy"), tarfile.TarInfo("x.cls")):
        safetar.check_member(info, "t.tar")
    d = tarfile.TarInfo("a")
    d.type = tarfile.DIRTYPE
    safetar.check_member(d, "t.tar")


def test_manifest_cannot_point_outside_its_directory(prepared, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    m = json.loads((prepared / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["file"] = "../outside.tar"
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"shard file name '../outside.tar' is not a plain file name"):
        Manifest.load(data)


def test_refusal_inside_a_dataloader_worker_keeps_its_type_and_one_line(prepared, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    for f in prepared.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    _poison_shard(data, "train-000002.tar", BAD_MEMBERS["dotdot"])
    with pytest.raises(UnsafeFileError, match=r"^[^\n]*train-000002.tar: tar member '../escape.npy' escapes[^\n]*$"):
        stream = TrainStream(data, 5, 0, 1, seed=0, num_workers=2, shuffle=False)
        it = iter(stream)
        for _ in range(stream.batches_per_epoch):
            next(it)
