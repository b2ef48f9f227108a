"""Tests for runtime.download: a tiny CIFAR-10 archive built here and served
from a local HTTP server on 127.0.0.1, never the real dataset host.

    python -m pytest -q tests/test_download.py
"""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import re
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from convspec.errors import SpecError
from runtime import download
from runtime.cifar import CIFAR10_TRAIN, load_cifar, write_batch
from runtime.download import fetch

CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
PER_BATCH = 8  # 7 files of 8 images: ~170 kB, several read chunks, so a cut lands mid-file


def _cifar_folder(root: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = []
    for name in CIFAR10_TRAIN + ["test_batch"]:
        images = rng.integers(0, 256, (PER_BATCH, 32, 32, 3), dtype=np.uint8)
        write_batch(folder / name, images, rng.integers(0, 10, PER_BATCH))
        if name != "test_batch":
            train.append(images)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": CLASSES}, protocol=2))
    return folder, np.concatenate(train)


def _tar_gz(add) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        add(tar)
    return buf.getvalue()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(bytes of cifar-10-python.tar.gz, its md5, the training images it holds)."""
    folder, train = _cifar_folder(tmp_path_factory.mktemp("src"))
    data = _tar_gz(lambda tar: tar.add(folder, arcname=folder.name))
    return data, hashlib.md5(data).hexdigest(), train


class Server:
    """Serves ``body`` at any path; ``mode`` picks how it misbehaves:
    "ok", "cut" (the first response stops after half the bytes),
    "cut-ignore-range" (cut, then answer Range requests with the whole file),
    "404"."""

    def __init__(self, body: bytes, mode: str = "ok"):
        self.body, self.mode = body, mode
        self.requests: list[dict] = []  # the headers of every request
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 5  # a stuck client cannot hold the server thread

            def do_GET(self):
                server.requests.append(dict(self.headers))
                server.respond(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar-10-python.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def respond(self, h):
        body, first = self.body, len(self.requests) == 1
        if self.mode == "404":
            h.send_error(404)
            return
        if first and self.mode.startswith("cut"):
            # Promise the whole file, send half, hang up.
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        start = h.headers.get("Range", "").removeprefix("bytes=").rstrip("-")
        if start.isdigit() and self.mode != "cut-ignore-range":
            n = int(start)
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {n}-{len(body) - 1}/{len(body)}")
            h.send_header("Content-Length", str(len(body) - n))
            h.end_headers()
            h.wfile.write(body[n:])
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve():
    servers = []

    def start(body, mode="ok"):
        servers.append(Server(body, mode))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # A proxy from the environment would intercept requests meant for 127.0.0.1.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _closed_port_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_download_extract_and_load(archive, serve, tmp_path, capsys):
    data, md5, train = archive
    server = serve(data)
    folder = fetch("cifar10", url=server.url, md5=md5, cache=tmp_path)
    assert folder == tmp_path / "cifar-10-batches-py"
    split = load_cifar(folder, "train")
    np.testing.assert_array_equal(split.images, train)
    assert split.classes[:2] == ["airplane", "automobile"]
    assert (tmp_path / "cifar-10-python.tar.gz").read_bytes() == data
    assert _leftovers(tmp_path) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    err = capsys.readouterr().err
    # Said before connecting: a link that never answers was silent for two minutes.
    assert err.startswith(f"downloading cifar10 from {server.url} into {tmp_path}\n")
    assert "download cifar10 [" in err  # the progress bar
    assert len(server.requests) == 1 and "Range" not in server.requests[0]


def test_second_call_uses_the_cache(archive, serve, tmp_path, monkeypatch):
    data, md5, _ = archive
    server = serve(data)
    monkeypatch.setenv("CONVSPEC_CACHE", str(tmp_path))
    monkeypatch.setenv("CONVSPEC_CIFAR10_URL", server.url)
    monkeypatch.setenv("CONVSPEC_CIFAR10_MD5", md5)
    first = fetch("cifar10", progress=False)
    assert len(server.requests) == 1
    assert fetch("cifar10", progress=False) == first == tmp_path / "cifar-10-batches-py"
    assert len(server.requests) == 1


def test_wrong_checksum(archive, serve, tmp_path):
    data, md5, _ = archive
    server = serve(data)
    with pytest.raises(SpecError) as err:
        fetch("cifar10", url=server.url, md5="0" * 32, cache=tmp_path, progress=False)
    text = str(err.value)
    assert "\n" not in text
    assert str(tmp_path / "cifar-10-python.tar.gz") in text
    assert f"has md5 {md5}, expected {'0' * 32}" in text
    assert _leftovers(tmp_path) == []  # no archive, no .part, no folder


def test_resume_after_a_cut(archive, serve, tmp_path):
    data, md5, train = archive
    server = serve(data, "cut")
    folder = fetch("cifar10", url=server.url, md5=md5, cache=tmp_path, progress=False)
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0]
    ranged = int(server.requests[1]["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < ranged <= len(data) // 2
    np.testing.assert_array_equal(load_cifar(folder, "train").images, train)


def test_server_that_ignores_range(archive, serve, tmp_path):
    data, md5, _ = archive
    server = serve(data, "cut-ignore-range")
    folder = fetch("cifar10", url=server.url, md5=md5, cache=tmp_path, progress=False)
    assert "Range" in server.requests[1]  # asked to resume, got the whole file, started over
    assert (tmp_path / "cifar-10-python.tar.gz").read_bytes() == data
    assert len(load_cifar(folder, "test").images) == PER_BATCH


def test_unreachable_host_says_where_to_put_the_archive(tmp_path, capsys):
    start = time.perf_counter()
    url = _closed_port_url()
    with pytest.raises(SpecError) as err:
        fetch("cifar10", url=url, cache=tmp_path, retries=1, timeout=2)
    assert time.perf_counter() - start < 5
    said = capsys.readouterr().err.splitlines()
    assert said[0] == f"downloading cifar10 from {url} into {tmp_path}"
    assert re.fullmatch(r"download cifar10: \w[^;]*; trying again \(1 of 1\)", said[1]), said  # each retry is said
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{tmp_path / 'cifar-10-python.tar.gz'}: cannot download cifar10 from http://127.0.0.1:")
    assert re.search(r"\(\w[^;]*\); download it elsewhere", text)  # the reason, e.g. "(Connection refused)"
    assert (f"download it elsewhere and put cifar-10-python.tar.gz in {tmp_path} "
            f"(md5 c58f30108f718f92721af3b95e74349a), or give the path of an extracted "
            f"cifar-10-batches-py folder instead of 'cifar10'") in text
    assert _leftovers(tmp_path) == []


def test_not_found_is_not_retried(archive, serve, tmp_path):
    server = serve(archive[0], "404")
    with pytest.raises(SpecError, match=r"\(HTTP 404 Not Found\); download it elsewhere"):
        fetch("cifar10", url=server.url, cache=tmp_path, retries=3, progress=False)
    assert len(server.requests) == 1


def test_archive_put_in_by_hand(archive, serve, tmp_path):
    data, md5, train = archive
    server = serve(data)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(data)
    # A half-extracted folder from some earlier attempt, without our marker, is replaced.
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"truncated")
    folder = fetch("cifar10", url=server.url, md5=md5, cache=tmp_path, progress=False)
    assert server.requests == []
    np.testing.assert_array_equal(load_cifar(folder, "train").images, train)


def test_wrong_archive_put_in_by_hand_is_kept_and_named(serve, tmp_path):
    server = serve(b"")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(SpecError, match="expected c58f30108f718f92721af3b95e74349a: not the official"):
        fetch("cifar10", url=server.url, cache=tmp_path, progress=False)
    assert server.requests == [] and (tmp_path / "cifar-10-python.tar.gz").exists()


def _evil_link(tar):
    info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _evil_path(tar):
    info = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
    payload = b"outside"
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("builtin_filter", [True, False], ids=["filter-data", "own-check"])
@pytest.mark.parametrize("evil", [_evil_link, _evil_path], ids=["symlink", "dotdot"])
def test_unsafe_archive_is_refused(evil, builtin_filter, serve, tmp_path, monkeypatch):
    if builtin_filter and not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile filter='data'")
    if not builtin_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    data = _tar_gz(evil)
    cache = tmp_path / "cache"
    server = serve(data)
    with pytest.raises(SpecError) as err:
        fetch("cifar10", url=server.url, md5=hashlib.md5(data).hexdigest(), cache=cache, progress=False)
    assert "\n" not in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)
    assert not (tmp_path / "escaped").exists()
    assert not (cache / "cifar-10-batches-py").exists()
    assert _leftovers(cache) == ["cifar-10-python.tar.gz"]  # no half-extracted temporary folder


def test_unknown_name():
    with pytest.raises(SpecError, match="no named dataset 'cifar11'; did you mean 'cifar10'"):
        fetch("cifar11")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVSPEC_CACHE", str(tmp_path))
    assert download.cache_dir() == tmp_path
    monkeypatch.delenv("CONVSPEC_CACHE")
    assert download.cache_dir() == Path.home() / ".cache" / "convspec"


def test_official_table():
    assert {k: (v.md5, v.folder) for k, v in download.DATASETS.items()} == {
        "cifar10": ("c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
        "cifar100": ("eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
    }
