"""Robust, resumable HTTP download and safe archive extraction (standard library only).

:func:`download` writes ``<dest>.part`` and renames it to ``dest`` only once the size and (when
given) the SHA-256 check out. An interrupted run leaves the ``.part`` behind; the next run resumes
it with an HTTP ``Range: bytes=N-`` request:

- ``206 Partial Content``: the server resumes at ``N`` (checked against ``Content-Range``);
- ``200 OK``: the server ignores ranges, the download restarts from byte 0;
- ``416 Range Not Satisfiable``: the ``.part`` is already complete (verified, then renamed).

Connection errors, cut connections (short reads, ``IncompleteRead``, ``ConnectionResetError``),
timeouts and 5xx/408/429 answers are retried with exponential backoff
(``backoff * 2**(k-1)`` seconds, at most 60 s). The failure counter resets whenever an attempt made
progress, so a long download over a flaky link finishes as long as bytes keep arriving; ``retries``
failures in a row without progress give up with :class:`DownloadError` (the ``.part`` is kept for
the next run). A 4xx answer (404...), an unknown host or a scheme other than http/https fails at
once with :class:`DownloadError` naming the URL. A SHA-256 mismatch raises :class:`ChecksumError`
and deletes the ``.part``, so the next run starts clean. A full disk raises :class:`DiskFullError`
naming the folder and the bytes needed.

:func:`safe_extract` unpacks .zip, .tar, .tar.gz/.tgz (detected from the file's content, not its
name) after validating *every* member first: absolute names, ``..`` components, symbolic and hard
links, devices, FIFOs and other non-regular members, and members whose path would resolve outside
the target through a link already there, make it raise :class:`UnsafeArchiveError` before
anything is written. Tar members are then extracted with ``filter="data"`` as a second line
of defence.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import re
import shutil
import socket
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

log = logging.getLogger(__name__)

USER_AGENT = "sparsegan-downloader/1.0 (+urllib)"
URL_HINT = "set data.oct2017.url in params.yaml to a working URL (or use data.source=folder)"
_MAX_SLEEP = 60.0
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """A download failed for good (bad URL, HTTP error, too many failed attempts, wrong size)."""


class ChecksumError(DownloadError):
    """The downloaded file's SHA-256 differs from the expected one (the .part was deleted)."""


class DiskFullError(DownloadError):
    """Not enough free space in the download folder."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target folder, or is a link or a device."""


# --------------------------------------------------------------------------------------- download


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _open_part(path: Path, mode: str) -> BinaryIO:
    """Open the .part file (a seam for tests that simulate a full disk)."""
    return open(path, mode)  # noqa: SIM115


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _disk_full(folder: Path, needed: int | None, free: int | None = None) -> DiskFullError:
    need = f"{_fmt_size(needed)} ({needed} bytes)" if needed is not None else "an unknown amount"
    have = f"; {_fmt_size(free)} free" if free is not None else ""
    return DiskFullError(f"not enough disk space in {folder}: the download needs {need} more{have}. "
                         f"Free some space (the partial download is kept and resumes) and run again.")


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/total`` or ``bytes */total`` -> (a, b, total); unknown parts are None."""
    if not value:
        return None, None, None
    m = re.match(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", value)
    if not m:
        return None, None, None
    start = int(m.group(1)) if m.group(1) else None
    end = int(m.group(2)) if m.group(2) else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, end, total


class _Retry(Exception):
    """A transient failure of one attempt (retried after a backoff)."""


def _verify_and_finish(part: Path, dest: Path, url: str, sha256: str, size: int | None) -> Path:
    got_size = part.stat().st_size
    if size is not None and got_size != size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{dest.name}: downloaded {got_size} bytes from {url} but expected {size}; "
                            f"the partial file was deleted. If the file changed, {URL_HINT}.")
    if sha256:
        actual = sha256_file(part)
        if actual != sha256.lower():
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{dest.name}: SHA-256 mismatch for {url}: expected {sha256.lower()}, got {actual}. "
                f"The partial download {part} was deleted, so the next run starts clean. If the "
                f"publisher changed the file on purpose, set data.oct2017.sha256 to the new value "
                f"(or to '' to skip the check).")
    os.replace(part, dest)
    log.info("downloaded %s (%d bytes)", dest, got_size)
    return dest


def download(url: str, dest: Path, *, sha256: str = "", size: int | None = None, retries: int = 5,
             backoff: float = 1.0, chunk: int = 1 << 20, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest`` (resumable, verified); return ``dest``.

    ``sha256``: expected hex digest ('' = no check). ``size``: expected size in bytes (None = take
    the server's word). If ``dest`` already exists and matches (checksum, else size), nothing is
    downloaded. See the module docstring for the retry/resume policy.
    """
    dest = Path(dest)
    sha256 = (sha256 or "").strip().lower()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"cannot download {url!r}: unsupported URL scheme {scheme or '(none)'!r} "
                            f"(only http and https); {URL_HINT}")
    if sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise DownloadError(f"{sha256!r} is not a SHA-256 hex digest (64 hex characters); fix "
                            f"data.oct2017.sha256")

    if dest.is_file():
        if sha256:
            actual = sha256_file(dest)
            if actual == sha256:
                log.info("%s already downloaded (checksum ok)", dest)
                return dest
            log.warning("%s exists but its SHA-256 is %s, expected %s: downloading it again",
                        dest, actual, sha256)
            dest.unlink()
        elif size is None or dest.stat().st_size == size:
            log.info("%s already downloaded", dest)
            return dest
        else:
            log.warning("%s exists but has %d bytes, expected %d: downloading it again",
                        dest, dest.stat().st_size, size)
            dest.unlink()

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    progress = _Progress(dest.name)
    try:
        while True:
            pos = part.stat().st_size if part.exists() else 0
            start_pos = pos
            try:
                _attempt(url, dest, part, pos, sha256, size, chunk, timeout, progress)
                return _verify_and_finish(part, dest, url, sha256, size)
            except _Retry as exc:
                new_pos = part.stat().st_size if part.exists() else 0
                failures = 0 if new_pos > start_pos else failures + 1
                if failures > retries:
                    raise DownloadError(
                        f"giving up on {url} after {failures} failed attempts in a row "
                        f"({exc}); the partial download {part} ({new_pos} bytes) is kept and the "
                        f"next run resumes it. If the URL no longer works, {URL_HINT}.") from None
                delay = min(_MAX_SLEEP, backoff * 2 ** max(failures - 1, 0))
                log.warning("download of %s interrupted at %d bytes (%s); retrying in %.1f s",
                            dest.name, new_pos, exc, delay)
                time.sleep(delay)
    finally:
        progress.close()


class _Progress:
    """A tqdm bar that survives retries (hidden when stderr is not a terminal)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar = None

    def start(self, total: int | None, pos: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            return
        if self.bar is None:
            self.bar = tqdm(total=total, initial=pos, unit="B", unit_scale=True,
                            unit_divisor=1024, desc=self.name, disable=None, leave=False)
        else:
            self.bar.reset(total=total)
            self.bar.update(pos)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _attempt(url: str, dest: Path, part: Path, pos: int, sha256: str, size: int | None, chunk: int,
             timeout: float, progress: _Progress) -> None:
    """One HTTP request that completes the .part; raises _Retry on transient failures."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if pos > 0:
        headers["Range"] = f"bytes={pos}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 (scheme checked)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and pos > 0:
            _, _, total = _parse_content_range(exc.headers.get("Content-Range"))
            expected = total if total is not None else size
            if expected is not None and pos == expected:
                return  # the .part is already complete
            if expected is None and sha256 and sha256_file(part) == sha256:
                return
            log.warning("%s: server refused to resume at byte %d (416); restarting from zero",
                        dest.name, pos)
            part.unlink(missing_ok=True)
            raise _Retry("HTTP 416 for a partial file that is not complete") from None
        if exc.code in _RETRY_STATUS:
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}; "
                            f"{URL_HINT}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, socket.gaierror):
            raise DownloadError(f"cannot download {url}: unknown host "
                                f"{urllib.parse.urlsplit(url).hostname!r} ({reason}); check the "
                                f"network, or {URL_HINT}") from None
        if isinstance(reason, (OSError, TimeoutError)):
            raise _Retry(f"connection error: {reason}") from None
        raise DownloadError(f"cannot download {url}: {reason}; {URL_HINT}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
        raise _Retry(f"connection error: {exc!r}") from None

    with resp:
        status = resp.status
        if status == 206:
            start, _, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != pos:
                log.warning("%s: server resumed at byte %s instead of %d; restarting from zero",
                            dest.name, start, pos)
                part.unlink(missing_ok=True)
                raise _Retry("server answered a different range")
            if total is None:
                length = resp.headers.get("Content-Length")
                total = pos + int(length) if length and length.isdigit() else None
            mode = "ab"
        elif status == 200:
            if pos > 0:
                log.info("%s: server ignores range requests; restarting from zero", dest.name)
            pos = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        else:
            raise DownloadError(f"cannot download {url}: unexpected HTTP status {status}; {URL_HINT}")

        if size is not None and total is not None and total != size:
            raise DownloadError(f"{dest.name}: the server at {url} reports {total} bytes but "
                                f"{size} were expected; the file has changed or the URL is wrong: "
                                f"{URL_HINT} (and data.oct2017.sha256 if known)")
        total = total if total is not None else size
        if total is not None:
            need = total - pos
            free = shutil.disk_usage(dest.parent).free
            if need > free:
                raise _disk_full(dest.parent, need, free)

        progress.start(total, pos)
        written = pos
        try:
            with _open_part(part, mode) as f:
                while True:
                    try:
                        # read1: returns what has arrived, so a timeout loses no bytes
                        block = resp.read1(chunk) if hasattr(resp, "read1") else resp.read(chunk)
                    except (TimeoutError, ConnectionError, http.client.HTTPException,
                            OSError) as exc:
                        f.flush()
                        raise _Retry(f"connection cut after {written} bytes: {exc!r}") from None
                    if not block:
                        break
                    f.write(block)
                    written += len(block)
                    progress.update(len(block))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(dest.parent, (total - written) if total is not None else None) \
                    from None
            raise

    if total is not None and written < total:
        raise _Retry(f"connection cut after {written} of {total} bytes")
    if total is not None and written > total:
        part.unlink(missing_ok=True)
        raise _Retry(f"received {written} bytes, more than the announced {total}")


# ------------------------------------------------------------------------------------ extraction


def _archive_kind(archive: Path) -> str:
    if zipfile.is_zipfile(archive):
        return "zip"
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except OSError:
        pass
    raise ValueError(f"{archive}: not a .zip, .tar, .tar.gz or .tgz archive (unknown content)")


def _safe_relpath(archive: Path, name: str) -> PurePosixPath:
    """The member's path relative to the target, or UnsafeArchiveError."""
    def refuse(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{archive}: refusing to extract member {name!r}: {why}; "
                                  f"nothing was extracted")

    if "\x00" in name:
        raise refuse("its name contains a NUL byte")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise refuse("it is an absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise refuse("it contains '..' and could escape the target folder")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _tar_plan(archive: Path, tf: tarfile.TarFile) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    plan = []
    for m in tf.getmembers():
        rel = _safe_relpath(archive, m.name)
        kind = None
        if m.issym():
            kind = f"a symbolic link (to {m.linkname!r})"
        elif m.islnk():
            kind = f"a hard link (to {m.linkname!r})"
        elif m.ischr() or m.isblk():
            kind = "a device file"
        elif m.isfifo():
            kind = "a FIFO"
        elif not (m.isreg() or m.isdir()):
            kind = f"an unsupported member type {m.type!r}"
        if kind:
            raise UnsafeArchiveError(f"{archive}: refusing to extract member {m.name!r}: it is "
                                     f"{kind}; links and special files are not allowed; nothing "
                                     f"was extracted")
        plan.append((m, rel))
    return plan


def _zip_plan(archive: Path, zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    plan = []
    for info in zf.infolist():
        rel = _safe_relpath(archive, info.filename)
        mode = info.external_attr >> 16
        kind = None
        if mode:
            if stat.S_ISLNK(mode):
                kind = "a symbolic link"
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                kind = "a device file"
            elif stat.S_ISFIFO(mode):
                kind = "a FIFO"
            elif stat.S_ISSOCK(mode):
                kind = "a socket"
        if kind:
            raise UnsafeArchiveError(f"{archive}: refusing to extract member {info.filename!r}: "
                                     f"it is {kind}; links and special files are not allowed; "
                                     f"nothing was extracted")
        plan.append((info, rel))
    return plan


def safe_extract(archive: Path, target: Path, *,
                 include: Callable[[PurePosixPath], bool] | None = None) -> list[Path]:
    """Extract ``archive`` (.zip, .tar, .tar.gz/.tgz) into ``target``; return the files written.

    Every member is validated before anything is written (see the module docstring); one unsafe
    member raises :class:`UnsafeArchiveError` naming it and nothing is extracted. ``include``
    (optional) selects members by their relative path (e.g. to skip the chest X-rays of a bundle);
    all members are validated either way.
    """
    archive, target = Path(archive), Path(target)
    kind = _archive_kind(archive)
    target_abs = os.path.abspath(target)
    target_real = os.path.realpath(target_abs)
    written: list[Path] = []

    def inside(rel: PurePosixPath) -> Path:
        out = os.path.normpath(os.path.join(target_abs, *rel.parts))
        # realpath: a link already inside the target (archives cannot add one) must not lead out
        real = os.path.realpath(out)
        if (out != target_abs and not out.startswith(target_abs + os.sep)) or \
                (real != target_real and not real.startswith(target_real + os.sep)):
            raise UnsafeArchiveError(f"{archive}: refusing to extract member {str(rel)!r}: it "
                                     f"would land outside {target}; nothing was extracted")
        return Path(out)

    if kind == "tar":
        with tarfile.open(archive, "r:*") as tf:
            plan = _tar_plan(archive, tf)
            for _, rel in plan:
                inside(rel)
            selected = [(m, rel) for m, rel in plan
                        if str(rel) != "." and (include is None or include(rel))]
            target.mkdir(parents=True, exist_ok=True)
            for m, rel in selected:
                m.name = rel.as_posix()
            members = [m for m, _ in selected]
            if hasattr(tarfile, "data_filter"):
                tf.extractall(target, members=members, filter="data")
            else:  # pragma: no cover (Python without PEP 706)
                tf.extractall(target, members=members)
            written = [inside(rel) for m, rel in selected if m.isreg()]
    else:
        with zipfile.ZipFile(archive) as zf:
            plan = _zip_plan(archive, zf)
            for _, rel in plan:
                inside(rel)
            target.mkdir(parents=True, exist_ok=True)
            for info, rel in plan:
                if str(rel) == "." or (include is not None and not include(rel)):
                    continue
                out = inside(rel)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                written.append(out)
    return written
