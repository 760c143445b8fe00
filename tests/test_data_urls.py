"""Shard URLs: the same data from a directory, http on loopback, a pipe: command and brace lists;
one-line errors naming the URL and rank; name checks that keep pipe: commands safe; the cache."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import metrics, rcn

from rcn_dist.data.loader import Manifest, TrainStream, load_arrays
from rcn_dist.errors import DataError


class Server:
    """A real HTTP server on 127.0.0.1 (port 0) serving `root`, counting the requests per path."""

    def __init__(self, root: Path) -> None:
        self.hits: Counter[str] = Counter()
        hits = self.hits

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                hits[self.path] += 1
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(fmnist_small):
    s = Server(fmnist_small.parent)
    yield s
    s.stop()


def one_line_error(match: str, fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and re.search(match, msg), msg
    return msg


def same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_every_url_form_reads_the_same_samples(fmnist_small, server):
    local = load_arrays(fmnist_small, "train")
    for url in (f"{server.url}/fmnist", f"{server.url}/fmnist/", f"pipe:cat {fmnist_small}/{{}}",
                f"file://{fmnist_small}"):
        assert same(load_arrays(url, "train"), local), url
    assert server.hits["/fmnist/train-000007.tar"] == 2
    # A brace list selects shards: the first four of eight training shards, the test split dropped.
    for url in (f"{fmnist_small}/train-{{000000..000003}}.tar", f"{server.url}/fmnist/train-00000{{0..3}}.tar"):
        m = Manifest.load(url)
        assert m.splits() == ["train"] and m.num_samples("train") == 256
        assert same(load_arrays(url, "train"), tuple(a[:256] for a in local)), url
    one_line_error(r"lists no shard 'train-000008.tar'", Manifest.load, f"{fmnist_small}/train-{{000000..000009}}.tar")
    one_line_error(r"one directory", Manifest.load, f"{{{fmnist_small},/tmp}}/train-000000.tar")


def test_workers_read_http_like_a_directory(fmnist_small, server):
    """DataLoader worker processes fetch over http; the batches equal the local directory's."""
    def two(src: str | Path) -> list[dict]:
        it = iter(TrainStream(src, 16, 0, 1, seed=3, num_workers=2))
        out = [next(it) for _ in range(3)]
        it.close()
        return out

    for a, b in zip(two(fmnist_small), two(f"{server.url}/fmnist"), strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in ("image", "label", "index"))


def test_bad_urls_fail_with_one_line_naming_url_and_rank(fmnist_small, server, tmp_path, monkeypatch):
    one_line_error(rf"^rank 0: cannot open {server.url}/nope/manifest.json: 404", Manifest.load, f"{server.url}/nope")
    one_line_error(r"^rank 0: cannot open http://127.0.0.1:1/fm/manifest.json: .*refused",
                   Manifest.load, "http://127.0.0.1:1/fm")
    one_line_error(r"^rank 0: cannot open pipe:cat /nonexistent/manifest.json: exit 1 \(cat: .*No such file",
                   Manifest.load, "pipe:cat /nonexistent/{}")
    one_line_error(r"^rank 0: cannot open pipe:exit 3 manifest.json: exit 3$", Manifest.load, "pipe:exit 3 {}")
    one_line_error(r"needs \{\} where the file name goes", Manifest.load, f"pipe:cat {fmnist_small}/manifest.json")
    one_line_error(r"^s3://bucket/fm: unsupported URL scheme", Manifest.load, "s3://bucket/fm")
    one_line_error(r"^pipe:echo '\[1\]' #manifest.json: not an rcn shard manifest", Manifest.load, "pipe:echo '[1]' #{}")
    # A shard missing on the server: found when it is read, in a worker, on the rank that reads it.
    (tmp_path / "part").mkdir()
    shutil.copy(fmnist_small / "manifest.json", tmp_path / "part")
    part = Server(tmp_path)
    try:
        monkeypatch.setenv("RANK", "1")
        stream = TrainStream(f"{part.url}/part", 16, 0, 1, seed=0, num_workers=2)
        one_line_error(rf"^rank 1: cannot open {part.url}/part/train-\d+.tar: 404", next, iter(stream))
    finally:
        part.stop()
    # A server that answers with different bytes: the manifest's checksum catches it.
    bad = tmp_path / "bad"
    shutil.copytree(fmnist_small, bad)
    (bad / "test-000002.tar").write_bytes((bad / "test-000001.tar").read_bytes())
    one_line_error(r"test-000002.tar: shard checksum does not match", load_arrays, f"pipe:cat {bad}/{{}}", "test")


@pytest.mark.parametrize("name", ["x;touch marker", "$(touch marker)", "a`touch marker`", "-x", "a b", "a?b"])
def test_pipe_and_url_names_are_plain_file_names(fmnist_small, tmp_path, monkeypatch, name):
    """A manifest cannot inject shell syntax into a pipe: command (or a query into a URL)."""
    d = tmp_path / "evil"
    shutil.copytree(fmnist_small, d)
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["file"] = name
    (d / "manifest.json").write_text(json.dumps(m))
    monkeypatch.chdir(tmp_path)
    srv = Server(tmp_path)
    try:
        for url in (f"pipe:cat {d}/{{}}", f"{srv.url}/evil"):
            one_line_error(rf"shard file name {re.escape(repr(name))} is not a plain file name", Manifest.load, url)
            with pytest.raises(DataError):
                load_arrays(url, "train")
    finally:
        srv.stop()
    assert not (tmp_path / "marker").exists()
    assert set(srv.hits) == {"/evil/manifest.json"}  # no shard was ever asked for


def test_cache_fills_once_and_serves_without_the_server(fmnist_small, tmp_path):
    srv = Server(fmnist_small.parent)
    cache = tmp_path / "cache"
    url = f"{srv.url}/fmnist"
    try:
        local = load_arrays(fmnist_small, "train")
        # Two workers (processes) fill the cache concurrently with different shards.
        it = iter(TrainStream(url, 16, 0, 1, seed=0, num_workers=2, cache_dir=cache))
        for _ in range(8):
            next(it)
        it.close()  # stops the workers, which hold a copy of the server's listening socket
        assert same(load_arrays(url, "train", cache_dir=cache), local)
        shard_hits = {p: n for p, n in srv.hits.items() if p.endswith(".tar")}
        assert len(shard_hits) == 8 and set(shard_hits.values()) == {1}, shard_hits
        cached = sorted(p.name for p in cache.iterdir())
        assert len(cached) == 8 and all(re.fullmatch(r"[0-9a-f]{16}-train-00000\d.tar", n) for n in cached)
        # Several threads reading the same new shards race to write them: all get good data.
        m = Manifest.load(url, cache_dir=cache)
        entries = m.shards("test")
        out: list[list[bytes]] = [[] for _ in range(4)]
        threads = [threading.Thread(target=lambda o=o: o.extend(m.read_shard_bytes(e) for e in entries))
                   for o in out]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(o == out[0] and len(o) == 8 for o in out)
        assert len(list(cache.iterdir())) == 16  # no temporary files left behind
        # A damaged cached copy is fetched again.
        victim = next(cache.glob("*-test-000000.tar"))
        victim.write_bytes(b"garbage")
        before = srv.hits["/fmnist/test-000000.tar"]
        load_arrays(url, "test", cache_dir=cache)
        assert srv.hits["/fmnist/test-000000.tar"] == before + 1
    finally:
        srv.stop()
    # The server is gone: a loaded manifest still reads every shard from the cache ...
    assert same(load_arrays_from(m, "train"), local)
    # ... and without the cache the shard cannot be had: one line naming it.
    m.cache_dir = None
    one_line_error(rf"^rank 0: cannot open {url}/train-000000.tar: .*refused", m.read_shard_bytes,
                   m.shards("train")[0])


def load_arrays_from(m: Manifest, split: str) -> tuple[np.ndarray, ...]:
    from rcn_dist.data.loader import _decode, iter_shard

    return _decode([s for e in m.shards(split) for s in iter_shard(m, e)], m)


# ---------------------------------------------------------------- training end to end
TRAIN = ["train", "--preset", "tiny", "--steps", "3", "train.eval_every=0", "train.ckpt_every=3"]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


@pytest.mark.slow
def test_training_through_pipe_and_http_gives_the_local_losses(fmnist_small, server, tmp_path):
    curves = {}
    for name, data in (("local", fmnist_small), ("pipe", f"pipe:cat {fmnist_small}/{{}}"),
                       ("http", f"{server.url}/fmnist")):
        rcn(*TRAIN, "--data", data, "--out", tmp_path / name)
        curves[name] = losses(tmp_path / name)
    assert len(curves["local"]) == 3
    assert curves["pipe"] == curves["local"] and curves["http"] == curves["local"], curves
    assert server.hits["/fmnist/manifest.json"] >= 1 and server.hits["/fmnist/train-000000.tar"] >= 1
    # The node-local cache through the CLI: the run fills it, and its losses stay the same.
    cache = tmp_path / "cache"
    rcn(*TRAIN, "--data", f"{server.url}/fmnist", "--out", tmp_path / "cached", f"data.cache_dir={cache}")
    assert losses(tmp_path / "cached") == curves["local"]
    n_train = len(list(fmnist_small.glob("train-*.tar")))
    assert len(list(cache.glob("*-train-*.tar"))) == n_train


@pytest.mark.slow
def test_training_on_a_bad_url_fails_with_one_line(fmnist_small, tmp_path):
    p = rcn(*TRAIN, "--data", "pipe:cat /nonexistent/fm/{}", "--out", tmp_path / "a", check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == ("rcn: error: rank 0: cannot open pipe:cat /nonexistent/fm/manifest.json: exit 1 "
                                "(cat: /nonexistent/fm/manifest.json: No such file or directory)"), p.stderr
    # The manifest is there, the shards are not: the error comes from a DataLoader worker.
    (tmp_path / "part").mkdir()
    shutil.copy(fmnist_small / "manifest.json", tmp_path / "part")
    srv = Server(tmp_path)
    try:
        p = rcn(*TRAIN, "--data", f"{srv.url}/part", "--out", tmp_path / "b", "data.num_workers=2", check=False)
    finally:
        srv.stop()
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"rcn: error: rank 0: cannot open {srv.url}/part/train-\d+.tar: 404 File not found", last), \
        p.stderr
    assert "Traceback" not in p.stderr
