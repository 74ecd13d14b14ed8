"""Point 5, files from outside: a checkpoint or model whose pickle would run code (here: create a
file) is refused by every loader (load_trained, the resume path, the score stage) without
running it; crafted tar and zip archives with escaping members are refused and write nothing
outside the target (tests/test_download.py has the full matrix: devices, FIFOs, NUL names...);
downloads are verified (size, SHA-256) before use."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from reliability_helpers import error_line, make_processed, run_stage, write_params
from sparsegan.data.download import (ChecksumError, DownloadError, UnsafeArchiveError, download,
                                     safe_extract)
from sparsegan.params import load_params
from sparsegan.checkpoint import MODEL_FORMAT, CheckpointError, load_trained
from sparsegan.train import train_model


class Payload:
    """Unpickling this calls ``open(target, "w")``: it creates a file (any call could be worse)."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _evil_checkpoint(path: Path, target: Path, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**extra, "model": {"encoder.blocks.0.0.weight": Payload(target)}}, path)


def test_the_payload_is_live(tmp_path):
    """Sanity: with weights_only=False the crafted file *does* create its target."""
    canary = tmp_path / "canary"
    _evil_checkpoint(tmp_path / "evil.pt", canary)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert canary.exists()


def test_pickle_payload_in_model_and_checkpoint_never_runs(tmp_path, guard, ledger):
    repo = tmp_path / "repo"
    params = load_params(write_params(repo))
    make_processed(repo, n_train=16)
    pwned = tmp_path / "PWNED"
    model = repo / "models/sparse_gan/s0/model.pt"
    checkpoint = repo / "checkpoints/sparse_gan/s0/checkpoint.pt"
    _evil_checkpoint(model, pwned, format=4, name="sparse_gan", seed=0, image_size=32,
                     config="x")
    _evil_checkpoint(checkpoint, pwned, config="x", epoch=1, history=[], mlflow_run_id=None,
                     optimizers={}, rng={})
    guard.protect(repo)
    ledger.faults(3)

    with pytest.raises(CheckpointError, match="refused to load this trained model") as info:
        load_trained(model.parent, model="sparse_gan")
    assert str(model) in str(info.value) and "could run code" in str(info.value)
    assert not pwned.exists()

    threads = torch.get_num_threads()
    try:
        with pytest.raises(CheckpointError, match="refused to load this training checkpoint"):
            train_model("sparse_gan", 0, params, repo / "data/processed/raw", repo / "models/x",
                        checkpoint.parent, log_mlflow=False)
    finally:
        torch.set_num_threads(threads)
    assert not pwned.exists() and checkpoint.exists()  # refused, and left for the user to see

    res = run_stage("score", "sparse_gan", "0", cwd=repo)
    assert res.returncode == 2
    assert "refused to load this trained model" in error_line(res.stderr)
    assert not pwned.exists() and not (repo / "scores").exists()


@pytest.mark.parametrize("content,match", [
    (b"PK\x03\x04 truncated zip", "not a readable trained model"),
    (b"", "not a readable trained model"),
    (None, "not a trained model of this pipeline"),
    ("v1", r"a model file of an older layout \(format 1"),
    ("v2", r"a model file of an older layout \(format 2"),
    ("other_model", r"holds model 'pix2pix', not 'autoencoder'"),
    ("bad_weights", r"its weights do not fit the architecture it describes"),
])
def test_corrupt_or_foreign_model_files_give_a_clear_error(tmp_path, ledger, content, match):
    model = tmp_path / "models/autoencoder/s0/model.pt"
    model.parent.mkdir(parents=True)
    if content is None:
        torch.save({"weights": torch.zeros(3)}, model)  # safe, but not ours
    elif content == "v1":  # the weights-only layout of earlier versions: no stored params
        torch.save({"variant": "autoencoder", "image_size": 32, "model": {}}, model)
    elif content == "v2":  # one file per variant, with its params
        torch.save({"format": 2, "variant": "autoencoder", "image_size": 32, "params": {},
                    "model": {}}, model)
    elif content in ("other_model", "bad_weights"):  # this format, of another model / no weights
        torch.save({"format": MODEL_FORMAT, "name": "pix2pix" if content == "other_model" else "autoencoder",
                    "seed": 0, "image_size": 32, "config": "x", "params": {}, "data": {},
                    "model": {}}, model)
    else:
        model.write_bytes(content)
    ledger.inputs()
    with pytest.raises(CheckpointError, match=match) as info:
        load_trained(model.parent, model="autoencoder")
    assert str(model) in str(info.value) and "\n" not in str(info.value)  # one line, the file


# ------------------------------------------------------------------------------------ archives


def _tar(path: Path, members: list[tuple[str, bytes | None, bytes, str]]) -> Path:
    """members: (name, data or None, tar type, link target)."""
    import io
    with tarfile.open(path, "w:gz") as tf:
        for name, data, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(data) if data is not None else 0
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _zip(path: Path, members: list[tuple[str, bytes, int]]) -> Path:
    """members: (name, data, unix mode or 0)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode:
                info.create_system, info.external_attr = 3, mode << 16
            zf.writestr(info, data)
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink()
            else b"<dir or link>" for p in root.rglob("*")}


ESCAPES = {
    "tar_dotdot": ("tar", "../../outside/evil.txt"),
    "tar_absolute": ("tar", "{outside}/evil.txt"),
    "tar_symlink": ("tar", "escape -> ../../outside"),
    "tar_hardlink": ("tar", "hard => {outside}/victim.txt"),
    "tar_symlink_then_file": ("tar", "d -> ../../outside; d/evil.txt"),
    "zip_dotdot": ("zip", "../../outside/evil.txt"),
    "zip_absolute": ("zip", "{outside}/evil.txt"),
    "zip_backslash_dotdot": ("zip", "..\\..\\outside\\evil.txt"),
    "zip_symlink": ("zip", "escape -> ../../outside"),
    "zip_through_existing_symlink": ("zip", "existing/evil.txt"),
    "tar_through_existing_symlink": ("tar", "existing/evil.txt"),
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_escaping_archive_members_are_refused_and_nothing_is_written(tmp_path, guard, ledger,
                                                                     case):
    kind, spec = ESCAPES[case]
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("the user's file")
    target = work / "downloads" / "extracted"
    if "existing" in case:  # the target already holds a link out (e.g. made by the user)
        target.mkdir(parents=True)
        (target / "existing").symlink_to(outside, target_is_directory=True)
    spec = spec.format(outside=outside)
    good = [("ok/first.txt", b"fine")]
    if kind == "tar":
        members = [(n, d, tarfile.REGTYPE, "") for n, d in good]
        for part in spec.split("; "):
            if " -> " in part:
                name, link = part.split(" -> ")
                members.append((name, None, tarfile.SYMTYPE, link))
            elif " => " in part:
                name, link = part.split(" => ")
                members.append((name, None, tarfile.LNKTYPE, link))
            else:
                members.append((part, b"evil", tarfile.REGTYPE, ""))
        archive = _tar(work / "bad.tar.gz", members)
    else:
        members = [(n, d, 0) for n, d in good]
        if " -> " in spec:
            name, link = spec.split(" -> ")
            members.append((name, link.encode(), 0o120777))
        else:
            members.append((spec, b"evil", 0))
        archive = _zip(work / "bad.zip", members)
    guard.protect(outside, archive)
    before_outside, before_target = _snapshot(outside), _snapshot(work)
    ledger.faults()
    with pytest.raises(UnsafeArchiveError, match="refusing to extract member"):
        safe_extract(archive, target)
    assert _snapshot(outside) == before_outside  # nothing written outside
    assert _snapshot(work) == before_target  # nor inside: all members are checked first
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


# ------------------------------------------------------------------------------------ downloads


@pytest.fixture
def file_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_downloads_are_verified_before_use(tmp_path, file_server, ledger):
    served, url = file_server
    data = os.urandom(50_000)
    (served / "OCT2017.tar.gz").write_bytes(data)
    dest = tmp_path / "downloads" / "OCT2017.tar.gz"
    ledger.faults(2)
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        download(f"{url}/OCT2017.tar.gz", dest, sha256="0" * 64, retries=0, backoff=0.01)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    with pytest.raises(DownloadError, match="expected"):
        download(f"{url}/OCT2017.tar.gz", dest, size=len(data) + 1, retries=0, backoff=0.01)
    assert not dest.exists()
    good = download(f"{url}/OCT2017.tar.gz", dest, sha256=hashlib.sha256(data).hexdigest())
    assert good.read_bytes() == data
