"""Downloader (resume, retries, checksums, errors), safe extraction, and fetch_oct2017 end to end.

A ThreadingHTTPServer on 127.0.0.1 (port 0) serves archives built here; its handler supports
``Range`` and can be told to cut the connection after N bytes, answer 5xx, or ignore ranges.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import random
import tarfile
import socket
import threading
import time
import urllib.error
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from sparsegan.data import download as dl
from sparsegan.data.download import (ChecksumError, DiskFullError, DownloadError,
                                     UnsafeArchiveError, download, safe_extract)
from sparsegan.data.oct2017 import MARKER, fetch_oct2017
from sparsegan.params import Oct2017Params


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        path = self.path.split("?")[0]
        rng = self.headers.get("Range")
        srv.requests.append((path, rng))
        if srv.fail_status.get(path):
            srv.fail_status[path].pop(0)
            status = srv.fail_status_code
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.files.get(path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.cut_after.pop(path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            stall = srv.stall.pop(path, 0.0)
            if stall:
                time.sleep(stall)  # longer than the client's timeout
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(request):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.requests, srv.cut_after = {}, [], {}
    srv.fail_status, srv.fail_status_code, srv.ignore_range, srv.stall = {}, 503, False, {}
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()

    def stop() -> None:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)

    request.addfinalizer(stop)
    return srv


def payload(n: int = 200_000, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


FAST = {"backoff": 0.01, "timeout": 5, "chunk": 8192}


# ------------------------------------------------------------------------------------ download


def test_download_resumes_after_cut_connection(server, tmp_path):
    data = payload()
    server.files["/a.bin"] = data
    server.cut_after["/a.bin"] = 50_000
    dest = tmp_path / "dl" / "a.bin"
    out = download(server.url + "/a.bin", dest, sha256=sha(data), **FAST)
    assert out == dest
    assert sha(dest.read_bytes()) == sha(data)
    assert not dest.with_name("a.bin.part").exists()
    assert [r for _, r in server.requests] == [None, "bytes=50000-"]


def test_download_resumes_after_read_timeout(server, tmp_path):
    data = payload(100_000)
    server.files["/a.bin"] = data
    server.cut_after["/a.bin"] = 30_000
    server.stall["/a.bin"] = 1.0
    dest = tmp_path / "a.bin"
    t0 = time.monotonic()
    download(server.url + "/a.bin", dest, sha256=sha(data), backoff=0.01, timeout=0.3, chunk=4096)
    assert time.monotonic() - t0 < 10
    assert dest.read_bytes() == data
    assert [r for _, r in server.requests] == [None, "bytes=30000-"]


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    data = payload()
    server.files["/a.bin"] = data
    server.ignore_range = True
    dest = tmp_path / "a.bin"
    dest.with_name("a.bin.part").write_bytes(b"stale bytes that must be dropped")
    download(server.url + "/a.bin", dest, sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    assert server.requests == [("/a.bin", "bytes=32-")]


def test_download_416_means_part_is_complete(server, tmp_path):
    data = payload(10_000)
    server.files["/a.bin"] = data
    dest = tmp_path / "a.bin"
    dest.with_name("a.bin.part").write_bytes(data)
    download(server.url + "/a.bin", dest, sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    assert server.requests == [("/a.bin", f"bytes={len(data)}-")]


def test_download_retries_5xx_then_succeeds(server, tmp_path):
    data = payload(5_000)
    server.files["/a.bin"] = data
    server.fail_status["/a.bin"] = [1, 1]
    dest = tmp_path / "a.bin"
    download(server.url + "/a.bin", dest, size=len(data), **FAST)
    assert dest.read_bytes() == data
    assert len(server.requests) == 3


def test_download_gives_up_after_retries(server, tmp_path):
    server.files["/a.bin"] = payload(5_000)
    server.fail_status["/a.bin"] = [1] * 10
    with pytest.raises(DownloadError, match="giving up") as exc:
        download(server.url + "/a.bin", tmp_path / "a.bin", retries=2, **FAST)
    assert server.url + "/a.bin" in str(exc.value)
    assert len(server.requests) == 3
    assert not (tmp_path / "a.bin").exists()


def test_checksum_mismatch_is_clear_and_leaves_nothing(server, tmp_path):
    data = payload(20_000)
    server.files["/a.bin"] = data
    dest = tmp_path / "a.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as exc:
        download(server.url + "/a.bin", dest, sha256=wrong, **FAST)
    msg = str(exc.value)
    assert "a.bin" in msg and wrong in msg and sha(data) in msg
    assert not dest.exists()
    assert not dest.with_name("a.bin.part").exists()


def test_404_gives_clear_download_error(server, tmp_path):
    url = server.url + "/missing.tar.gz"
    with pytest.raises(DownloadError) as exc:
        download(url, tmp_path / "x.tar.gz", **FAST)
    msg = str(exc.value)
    assert url in msg and "404" in msg and "data.oct2017.url" in msg
    assert len(server.requests) == 1  # not retried
    assert not (tmp_path / "x.tar.gz").exists()


def test_unknown_host_gives_clear_download_error(tmp_path, monkeypatch):
    def fail(req, timeout):  # noqa: ANN001
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(dl.urllib.request, "urlopen", fail)
    url = "https://no-such-host.invalid/OCT2017.tar.gz"
    with pytest.raises(DownloadError) as exc:
        download(url, tmp_path / "a.tar.gz", **FAST)
    msg = str(exc.value)
    assert url in msg and "unknown host 'no-such-host.invalid'" in msg and "data.oct2017.url" in msg


def test_unsupported_scheme_and_bad_sha(tmp_path):
    with pytest.raises(DownloadError, match="unsupported URL scheme 'ftp'.*data.oct2017.url"):
        download("ftp://example.invalid/a.zip", tmp_path / "a.zip")
    with pytest.raises(DownloadError, match="not a SHA-256"):
        download("http://127.0.0.1:9/a.zip", tmp_path / "a.zip", sha256="abc")


def test_existing_dest_with_right_checksum_is_not_downloaded(server, tmp_path):
    data = payload(1_000)
    dest = tmp_path / "a.bin"
    dest.write_bytes(data)
    assert download(server.url + "/a.bin", dest, sha256=sha(data), **FAST) == dest
    assert server.requests == []
    # wrong content on disk: downloaded again
    server.files["/a.bin"] = data
    dest.write_bytes(b"corrupt")
    download(server.url + "/a.bin", dest, sha256=sha(data), **FAST)
    assert dest.read_bytes() == data and len(server.requests) == 1


def test_size_mismatch_with_server_is_refused(server, tmp_path):
    server.files["/a.bin"] = payload(1_000)
    with pytest.raises(DownloadError, match="reports 1000 bytes but 999 were expected"):
        download(server.url + "/a.bin", tmp_path / "a.bin", size=999, **FAST)


def test_disk_full_precheck_names_folder_and_size(server, tmp_path, monkeypatch):
    server.files["/a.bin"] = payload(10_000)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
    with pytest.raises(DiskFullError) as exc:
        download(server.url + "/a.bin", tmp_path / "a.bin", **FAST)
    assert str(tmp_path) in str(exc.value) and "10000 bytes" in str(exc.value)


def test_disk_full_enospc_while_writing(server, tmp_path, monkeypatch):
    server.files["/a.bin"] = payload(10_000)

    class Full(io.BytesIO):
        def write(self, b):  # noqa: ANN001
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl, "_open_part", lambda path, mode: Full())
    with pytest.raises(DiskFullError) as exc:
        download(server.url + "/a.bin", tmp_path / "a.bin", **FAST)
    assert "not enough disk space in " + str(tmp_path) in str(exc.value)
    assert "10000 bytes" in str(exc.value)


# ------------------------------------------------------------------------------------ extraction


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def _file(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), b"content of " + name.encode()


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("bad", ["dotdot", "absolute", "symlink", "hardlink", "device", "fifo"])
def test_safe_extract_refuses_unsafe_tar_and_writes_nothing(tmp_path, bad):
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    target = work / "target"
    members = [_file("ok/first.txt")]
    name = {"dotdot": "../evil.txt", "absolute": str(outside / "evil.txt"),
            "symlink": "link", "hardlink": "hard", "device": "dev", "fifo": "fifo"}[bad]
    if bad in ("dotdot", "absolute"):
        members.append(_file(name))
    elif bad == "symlink":
        members += [_link(name, "../outside", tarfile.SYMTYPE)]
    elif bad == "hardlink":
        members += [_link(name, str(outside / "x"), tarfile.LNKTYPE)]
    else:
        info = tarfile.TarInfo(name)
        info.type = tarfile.CHRTYPE if bad == "device" else tarfile.FIFOTYPE
        members.append((info, None))
    members.append(_file("ok/last.txt"))
    archive = _tar(work / "bad.tar.gz", members, "w:gz")
    before_work, before_out = _tree(work), _tree(outside)
    with pytest.raises(UnsafeArchiveError) as exc:
        safe_extract(archive, target)
    assert repr(name) in str(exc.value)
    assert not target.exists()
    assert _tree(work) == before_work and _tree(outside) == before_out == []
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_refuses_zip_with_dotdot(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    archive = work / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/first.txt", "fine")
        zf.writestr("../evil.txt", "evil")
    target = work / "target"
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./evil\.txt'"):
        safe_extract(archive, target)
    assert not target.exists()
    assert _tree(tmp_path) == ["work", "work/bad.zip"]


def test_safe_extract_refuses_zip_symlink(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract(archive, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_safe_extract_good_archives(tmp_path):
    files = {"a/b/one.txt": b"one", "a/two.txt": b"two", "./a/c/three.bin": b"\x00\x01"}
    tgz = tmp_path / "good.tgz"
    _tar(tgz, [(tarfile.TarInfo("a/d"), None)] + [(tarfile.TarInfo(n), d) for n, d in files.items()],
         "w:gz")
    # TarInfo("a/d") with no data is a zero-length regular file; also add a real directory
    out = safe_extract(tgz, tmp_path / "t1")
    assert sorted(p.relative_to(tmp_path / "t1").as_posix() for p in out) == \
        ["a/b/one.txt", "a/c/three.bin", "a/d", "a/two.txt"]
    assert (tmp_path / "t1/a/b/one.txt").read_bytes() == b"one"
    assert (tmp_path / "t1/a/c/three.bin").read_bytes() == b"\x00\x01"

    z = tmp_path / "good.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("keep/x.txt", "x")
        zf.writestr("chest_xray/y.txt", "y")
        zf.writestr("keep/sub/", "")
    out = safe_extract(z, tmp_path / "t2", include=lambda rel: "chest_xray" not in rel.parts)
    assert [p.relative_to(tmp_path / "t2").as_posix() for p in out] == ["keep/x.txt"]
    assert (tmp_path / "t2/keep/sub").is_dir()
    assert not (tmp_path / "t2/chest_xray").exists()


def test_safe_extract_rejects_non_archive(tmp_path):
    f = tmp_path / "x.tar.gz"
    f.write_bytes(b"not an archive at all" * 100)
    with pytest.raises(ValueError, match="not a .zip, .tar"):
        safe_extract(f, tmp_path / "t")


# ------------------------------------------------------------------------------------ fetch_oct2017

COUNTS = {("train", "NORMAL"): 4, ("train", "CNV"): 3, ("train", "DME"): 2, ("train", "DRUSEN"): 2,
          ("test", "NORMAL"): 2, ("test", "CNV"): 1, ("test", "DME"): 1, ("test", "DRUSEN"): 1}


def _jpeg(seed: int) -> bytes:
    img = Image.new("L", (12, 10), color=seed * 17 % 256)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def _oct_members(root: str) -> dict[str, bytes]:
    out, k = {}, 0
    for (split, cls), n in COUNTS.items():
        for i in range(n):
            k += 1
            out[f"{root}/{split}/{cls}/{cls}-{1000 + i % 2}-{i}.jpeg"] = _jpeg(k)
    return out


def _check_manifest(df, raw: Path) -> None:
    got = df.groupby(["official_split", "class"]).size().to_dict()
    assert got == COUNTS
    assert list(df.columns) == ["path", "class", "patient", "official_split", "mask"]
    assert (df["mask"] == "").all()
    assert set(df["patient"]) == {"1000", "1001"}
    for p in df["path"]:
        assert not Path(p).is_absolute() and p.startswith("oct2017/")
        assert (raw / p).is_file()


def test_fetch_oct2017_v2_tar_end_to_end(server, tmp_path):
    members = _oct_members("OCT2017")
    members["OCT2017/train/CNV/._CNV-1000-0.jpeg"] = b"appledouble"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    server.files["/OCT2017.tar.gz"] = data
    server.cut_after["/OCT2017.tar.gz"] = len(data) // 3
    raw = tmp_path / "data" / "raw"
    p = Oct2017Params(version="v2", url=server.url + "/OCT2017.tar.gz", sha256=sha(data))
    df = fetch_oct2017(p, raw)
    _check_manifest(df, raw)
    assert (raw / "downloads" / "OCT2017.tar.gz").read_bytes() == data
    assert [r for _, r in server.requests] == [None, f"bytes={len(data) // 3}-"]
    assert not list((raw / "oct2017").rglob("._*"))
    # second run: no download, no extraction
    marker = raw / "oct2017" / MARKER
    stamp = marker.stat().st_mtime_ns
    df2 = fetch_oct2017(p, raw)
    assert df2.equals(df)
    assert len(server.requests) == 2
    assert marker.stat().st_mtime_ns == stamp
    assert json.loads(marker.read_text())["archive"] == "OCT2017.tar.gz"
    # the archive may be deleted once extracted; another checksum means a fresh download
    (raw / "downloads" / "OCT2017.tar.gz").unlink()
    assert fetch_oct2017(p, raw).equals(df) and len(server.requests) == 2
    p_other = Oct2017Params(version="v2", url=p.url, sha256="2" * 64)
    with pytest.raises(ChecksumError):
        fetch_oct2017(p_other, raw)
    assert len(server.requests) == 3


def test_fetch_oct2017_v3_zip_skips_chest_xray(server, tmp_path):
    members = _oct_members("CellData/OCT")
    members["CellData/chest_xray/train/NORMAL/IM-0001.jpeg"] = _jpeg(99)
    members["CellData/chest_xray/train/PNEUMONIA/x.jpeg"] = _jpeg(98)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, d in members.items():
            zf.writestr(name, d)
    data = buf.getvalue()
    server.files["/files/abc/file_downloaded"] = data
    raw = tmp_path / "raw"
    p = Oct2017Params(version="v3", url=server.url + "/files/abc/file_downloaded", sha256=sha(data))
    df = fetch_oct2017(p, raw)
    _check_manifest(df, raw)
    assert (raw / "downloads" / "ZhangLabData.zip").is_file()
    assert not (raw / "oct2017" / "CellData" / "chest_xray").exists()
    assert all(p.startswith("oct2017/CellData/OCT/") for p in df["path"])


def test_fetch_oct2017_checksum_mismatch(server, tmp_path):
    server.files["/OCT2017.tar.gz"] = b"x" * 100
    p = Oct2017Params(version="v2", url=server.url + "/OCT2017.tar.gz", sha256="1" * 64)
    with pytest.raises(ChecksumError, match="OCT2017.tar.gz"):
        fetch_oct2017(p, tmp_path)
    assert not (tmp_path / "downloads" / "OCT2017.tar.gz").exists()
    assert not (tmp_path / "oct2017").exists()


def test_acquire_oct2017_with_separate_downloads_dir(server, tmp_path):
    """The acquire stage's form: archive and tree in downloads_dir, manifest in raw_dir."""
    import pandas as pd

    from sparsegan.data.sources import acquire
    from sparsegan.params import DataParams, Params

    members = _oct_members("OCT2017")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, d in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(d)
            tf.addfile(info, io.BytesIO(d))
    data = buf.getvalue()
    server.files["/v2/OCT2017.tar.gz"] = data
    oct_p = Oct2017Params(version="v2", url=server.url + "/v2/OCT2017.tar.gz", sha256=sha(data))
    params = Params(data=DataParams(source="oct2017", oct2017=oct_p))
    raw, downloads = tmp_path / "data" / "raw", tmp_path / "data" / "downloads"
    acquire(params, raw, downloads)
    assert (downloads / "OCT2017.tar.gz").read_bytes() == data
    df = pd.read_csv(raw / "manifest.csv", keep_default_na=False, dtype=str)
    assert df.groupby(["official_split", "class"]).size().to_dict() == COUNTS
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert all(str(downloads / "oct2017" / "OCT2017") in p for p in df["path"])
    assert not (raw / "oct2017").exists() and not (raw / "downloads").exists()
