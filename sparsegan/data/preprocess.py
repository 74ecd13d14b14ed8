"""Decode, convert to 8-bit grayscale and resize every split's images into memory-mappable arrays.

Per split ``<name>`` (see :mod:`sparsegan.data` for the contract) this writes into ``out_dir``:

``<name>.npy``        uint8 ``[N, 1, S, S]``, written through ``np.lib.format.open_memmap`` (never
                      all in RAM), so that training reads it with ``np.load(mmap_mode="r")``
``<name>_masks.npy``  uint8 0/1, same shape, only when some row has a lesion mask; rows without a
                      mask are all zero
``<name>.csv``        the rows kept, in array order

and :func:`preprocess_all` adds ``skipped.csv`` (``file, reason``), ``duplicates.csv`` and
``summary.json``.

Image policy (:func:`load_gray`):

* JPEGs are decoded with ``Image.draft("L", (S, S))``: libjpeg's reduced DCT decoding at scale
  1/2, 1/4 or 1/8 (never below S) straight to grayscale, several times faster on large B-scans.
* Any mode becomes 8-bit grayscale: RGB/CMYK/YCbCr/P -> luma (ITU-R 601, as ``convert("L")``);
  anything with alpha (RGBA, LA, PA, P with transparency) is composited on black first; 16-bit
  and 32-bit integer or float images (``I;16*``, ``I``, ``F``) are stretched linearly from their
  own min..max to 0..255 (16-bit OCT exports often hold 12-bit data, which the type's 0..65535
  would leave nearly black; clipping at 255 would saturate them).
* JPEG draft decoding never stops at S itself: a 512x512 scan would come out of the 1/8 DCT at
  exactly 64x64 and skip the resize, while a 512x496 one (64x62) is smoothed by it; that
  difference in grain alone ranked 512x512 normals as anomalies. Asking for S + 1 makes the final
  antialiased resize reduce every image (at 224 nothing changes: 512 -> 256 -> 224).
* White registration corners (the wedges of a rotated frame) are filled with the background of
  their rows when ``corners`` is true (:func:`fill_corners`); ``summary.json`` counts the filled
  images per split. Masks are unchanged. The stage makes both variants
  (:func:`preprocess_variants`: ``data/processed/raw`` and ``data/processed/filled``), and
  each model reads the one its param ``preprocess.variant.<model>`` names.
* Every image is resized to S x S with Pillow's antialiased BILINEAR filter (``reducing_gap=3``);
  **the aspect ratio is not preserved**: the paper resizes the B-scans (512x496, 768x496,
  1536x496, ...) to 224x224, and so do we. Masks are binarised (nonzero = lesion) and resized
  with NEAREST, so they stay 0/1.
* Skipped, with a short reason in ``skipped.csv``, never a crash: a missing, zero-byte,
  not-a-regular (folder, FIFO, device), non-image, truncated or otherwise undecodable file, a
  decompression bomb (more than ``MAX_PIXELS`` = 100 MP, judged from the header before any pixel
  is decoded; Pillow's warning is turned into an error), an image smaller than
  ``MIN_SIDE`` = 32 px on a side ("too small"), and an image whose listed mask cannot be read.
* Duplicates (the same bytes under two names or listed twice, within or across splits) are
  **kept, each with its own label**, and listed in ``duplicates.csv`` (``file, split, class,
  duplicate_of, duplicate_of_split, duplicate_of_class, conflict``; the first occurrence in
  train, val, test order is the original) and counted in ``summary.json`` (``duplicates``:
  files, across_splits, label_conflicts), with a warning on stderr. A label is never changed or
  dropped silently: a duplicate whose class differs from its original's has ``conflict`` true.
* Decoding runs in a ``multiprocessing`` pool (``workers``; 0 = all cores) over chunks of rows
  with ``imap``; each worker writes its images straight into their rows of the memory-mapped
  output (only digests and skip reasons come back), the rows of skipped files are closed up at
  the end, so the output keeps the input order; a tqdm bar shows progress (``make bench``
  measures the rate against a plain PIL loop).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageFile
from scipy import ndimage
from tqdm import tqdm

MAX_PIXELS = 100_000_000  # larger images are treated as decompression bombs and skipped
MIN_SIDE = 32  # smaller images are skipped as "too small"
CHUNK = 32  # rows per pool task

Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow raises above 2x this, warns above it
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey bottom

_SPLITS = ("train", "val", "test")


class SkipImage(Exception):
    """The image cannot be used; the message is the short reason written to ``skipped.csv``."""


def _open(path: str | os.PathLike) -> Image.Image:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SkipImage("missing file") from None
    except OSError as exc:
        raise SkipImage(f"unreadable: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):  # a folder, FIFO or device: never opened (a FIFO blocks)
        raise SkipImage("not a regular file")
    size = st.st_size
    if size == 0:
        raise SkipImage("empty file (0 bytes)")
    try:
        im = Image.open(path)
    except Image.DecompressionBombError:
        raise SkipImage("decompression bomb (more than "
                        f"{2 * MAX_PIXELS // 1_000_000} MP)") from None
    except Image.UnidentifiedImageError:
        raise SkipImage("not an image") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise SkipImage(f"decompression bomb ({w}x{h} pixels)")
    return im


def _to_gray(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit 'L' (see the module docstring), or 'F' holding 0..255 floats."""
    mode = im.mode
    if mode == "L":
        return im
    if mode in ("1", "RGB", "CMYK", "YCbCr"):
        return im.convert("L") if mode != "CMYK" else im.convert("RGB").convert("L")
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.float32))  # mode 'F'
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        return _to_gray(im)
    if mode in ("PA", "RGBa", "La"):
        im = im.convert("RGBA" if mode != "La" else "LA")
        return _to_gray(im)
    if mode in ("RGBA", "LA"):
        alpha = im.getchannel("A")
        gray = im.convert("RGB" if mode == "RGBA" else "L").convert("L")
        return ImageChops.multiply(gray, alpha)  # gray * alpha / 255: composited on black
    if mode == "LAB":
        return im.getchannel("L")  # lightness, already 0..255
    try:  # HSV, RGBX, ...
        return im.convert("RGB").convert("L")
    except (ValueError, OSError):
        return im.convert("L")


def _resize(im: Image.Image, size: int) -> np.ndarray:
    out = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    a = np.asarray(out)
    if a.dtype != np.uint8:  # 'F': round and clip the 0..255 floats
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return a


def load_gray(path: str | os.PathLike, size: int, corners: bool = False) -> np.ndarray:
    """The image at ``path`` as 8-bit grayscale, resized to ``size x size`` (uint8 [size, size]),
    its white registration corners filled (:func:`fill_corners`) when ``corners`` is true.

    Raises :class:`SkipImage` with a short reason when the file cannot be used.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open(path) as im:
                w, h = im.size
                if min(w, h) < MIN_SIDE:
                    raise SkipImage(f"too small ({w}x{h})")
                if im.format == "JPEG":
                    # reduced DCT decoding straight to gray, never down to `size` itself (see
                    # the module docstring): the final antialiased resize always reduces
                    im.draft("L", (size + 1, size + 1))
                im.load()
                return _finish(im, size, corners)
    except SkipImage:
        raise
    except Image.DecompressionBombWarning:
        raise SkipImage("decompression bomb") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg:
            raise SkipImage("truncated image") from None
        raise SkipImage(f"corrupt image: {msg[:100]}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure skips the file, never a crash
        raise SkipImage(f"{type(exc).__name__}: {str(exc)[:100]}") from None


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as 8-bit grayscale at its own size (uint8 [H, W]), converted as
    :func:`load_gray` converts (without the resize): for showing results on the scan itself."""
    try:
        with _open(path) as im:
            im.load()
            return _as_uint8(_to_gray(im))
    except SkipImage:
        raise
    except Exception as exc:  # noqa: BLE001 - as load_gray: never a crash
        raise SkipImage(f"{type(exc).__name__}: {str(exc)[:100]}") from None


def gray_full_from_array(frame: np.ndarray) -> np.ndarray:
    """A 2-D frame as 8-bit grayscale at its own size (the conversion of :func:`gray_from_array`
    without the resize)."""
    return _as_uint8(_to_gray(Image.fromarray(frame if frame.dtype == np.uint8
                                              else frame.astype(np.float32))))


def _as_uint8(im: Image.Image) -> np.ndarray:
    return np.clip(np.rint(np.asarray(im, dtype=np.float32)), 0, 255).astype(np.uint8)


def _finish(im: Image.Image, size: int, corners: bool) -> np.ndarray:
    out = _resize(_to_gray(im), size)
    return fill_corners(out) if corners else out


def gray_from_array(frame: np.ndarray, size: int, corners: bool = False) -> np.ndarray:
    """A decoded 2-D frame (e.g. one DICOM frame, any integer or float type) converted exactly
    as :func:`load_gray` converts a file: 8-bit as is, deeper data stretched from its own
    min..max, resized to ``size x size``, corners filled when ``corners``. SkipImage when it is
    too small or not 2-D."""
    if frame.ndim != 2:
        raise SkipImage(f"not a 2-D grayscale frame (shape {frame.shape})")
    h, w = frame.shape
    if min(w, h) < MIN_SIDE:
        raise SkipImage(f"too small ({w}x{h})")
    im = Image.fromarray(frame if frame.dtype == np.uint8 else frame.astype(np.float32))
    return _finish(im, size, corners)


def fill_corners(image: np.ndarray, high: int = 250, low: int = 128,
                 min_area: float = 0.002) -> np.ndarray:
    """``image`` (uint8 [H, W]) with its white registration wedges replaced by background.

    OCT2017 scans registered by the device often carry white (255) wedges in a corner, where the
    rotated frame left no data (README: how many real and synthetic scans have them). They are
    not anatomy, yet at a few percent of the pixels they dominate a
    reconstruction error (an autoencoder cannot predict where a wedge starts). A wedge is a
    connected region of pixels >= ``low`` that holds a saturated pixel (>= ``high``) on the top or
    bottom row within a quarter of the width from a corner, and covers at least ``min_area`` of the
    image; it is grown by one pixel (the antialiased edge) and each of its rows is filled with the
    median of the row's other pixels (vitreous above, deep choroid below), or of the whole image
    when the wedge covers most of the row. Tissue is left alone unless it is saturated where it
    touches the top or bottom edge near a corner, or bright (>= ``low``) and in contact with a
    wedge (vitreous or deep choroid normally separates them). Returns ``image`` itself when
    nothing is filled.
    """
    h, w = image.shape
    edge = max(1, w // 4)
    cols = np.r_[0:edge, w - edge:w]
    if not any((image[row, cols] >= high).any() for row in (0, h - 1)):
        return image
    labels, n = ndimage.label(image >= low)
    seeds = np.zeros(n + 1, bool)
    for row in (0, h - 1):
        seeds[labels[row, cols][image[row, cols] >= high]] = True
    seeds[0] = False
    seeds &= np.bincount(labels.ravel(), minlength=n + 1) >= max(2.0, min_area * image.size)
    if not seeds.any():
        return image
    wedge = ndimage.binary_dilation(seeds[labels])
    out = image.copy()
    fallback = np.median(image[~wedge]) if not wedge.all() else 0
    for r in np.nonzero(wedge.any(axis=1))[0]:
        rest = image[r][~wedge[r]]
        out[r, wedge[r]] = np.median(rest) if rest.size >= edge else fallback
    return out


def load_mask(path: str | os.PathLike, size: int) -> np.ndarray:
    """A lesion mask (nonzero = lesion) as uint8 0/1 ``[size, size]``, resized with NEAREST."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open(path) as im:
                im.load()
                a = np.asarray(im)
    except SkipImage:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SkipImage(f"{type(exc).__name__}: {str(exc)[:100]}") from None
    if a.ndim == 3:
        a = a.any(axis=2) if a.shape[2] != 2 and a.shape[2] != 4 else a[..., :-1].any(axis=2)
    binary = Image.fromarray((a != 0).astype(np.uint8))
    return np.asarray(binary.resize((size, size), Image.Resampling.NEAREST), dtype=np.uint8)


def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b-128 of the file's bytes (finds the same image under two names)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _load_chunk(args: tuple[list[tuple[int, str, str]], int, bool, str, str | None]) -> list[tuple]:
    """Worker: decode a chunk of rows and write each image (and mask) into its row ``i`` of the
    output arrays, which every worker opens memory-mapped (the images never travel back through
    the pool's pipe, which cost a fifth of the throughput on 2 cores); returns
    ``(row, reason or None, digest or None, corners filled)`` for each row."""
    rows, size, corners, img_file, mask_file = args
    images = np.load(img_file, mmap_mode="r+")
    masks = np.load(mask_file, mmap_mode="r+") if mask_file else None
    out = []
    for i, path, mask_path in rows:
        try:
            img = load_gray(path, size)
            digest = file_digest(path)
        except SkipImage as exc:
            out.append((i, str(exc), None, False))
            continue
        except OSError as exc:  # vanished or unreadable between decoding and hashing
            out.append((i, f"unreadable: {exc.strerror or exc}", None, False))
            continue
        filled = fill_corners(img) if corners else img
        mask = None
        if mask_path:
            try:
                mask = load_mask(mask_path, size)
            except SkipImage as exc:
                out.append((i, f"mask {mask_path}: {exc}", None, False))
                continue
        images[i, 0] = filled
        if masks is not None and mask is not None:  # rows without a mask stay all zero
            masks[i, 0] = mask
        out.append((i, None, digest, filled is not img))
    del images, masks  # unmap; the pages are the file's, the parent sees them
    return out


def _shrink_npy(path: Path, n: int) -> None:
    """Keep the first ``n`` rows of the C-ordered ``.npy`` at ``path`` (rewrites the header)."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
        offset = f.tell()
        new_shape = (n, *shape[1:])
        header = _header_bytes(new_shape, dtype, version)
        if len(header) == offset:
            f.seek(0)
            f.write(header)
            f.truncate(offset + n * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
            return
    # Header length changed (never for our shapes, but be safe): copy in chunks.
    src = np.load(path, mmap_mode="r")
    tmp = path.with_name(path.name + ".shrink")
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=new_shape)
    for s in range(0, n, 4096):
        dst[s:s + 4096] = src[s:min(n, s + 4096)]
    dst.flush()
    del dst, src
    os.replace(tmp, path)


def _header_bytes(shape: tuple, dtype: np.dtype, version: tuple[int, int]) -> bytes:
    import io
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buf, d)
    else:
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def preprocess_split(df: pd.DataFrame, size: int, out_dir: Path, name: str,
                     workers: int = 0, corners: bool = False) -> dict:
    """Decode the rows of ``df`` (columns ``path``, optional ``mask``, ...) into ``out_dir``.

    Returns ``{"name", "rows", "kept", "skipped" (list of {"file", "reason"}), "masks" (bool),
    "corners_filled" (images whose registration corners were filled), "seconds", "images_per_s",
    "digests" (file digest of each kept row, in array order)}``; the
    caller appends ``skipped`` to ``skipped.csv``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = df.reset_index(drop=True)
    paths = df["path"].fillna("").astype(str).tolist()
    masks = (df["mask"].fillna("").astype(str).tolist() if "mask" in df.columns
             else [""] * len(df))
    has_masks = any(masks)
    n = len(df)

    img_path = out_dir / f"{name}.npy"
    mask_path = out_dir / f"{name}_masks.npy"
    tmp_img = out_dir / f".{name}.npy.tmp"
    tmp_mask = out_dir / f".{name}_masks.npy.tmp"
    images = np.lib.format.open_memmap(tmp_img, mode="w+", dtype=np.uint8,
                                       shape=(n, 1, size, size))
    mask_arr = (np.lib.format.open_memmap(tmp_mask, mode="w+", dtype=np.uint8,
                                          shape=(n, 1, size, size)) if has_masks else None)

    rows = [(i, paths[i], masks[i]) for i in range(n)]
    chunks = [(rows[s:s + CHUNK], size, corners, str(tmp_img),
               str(tmp_mask) if has_masks else None)
              for s in range(0, n, CHUNK)]
    workers = workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(chunks)))
    kept: list[int] = []
    digests: list[str] = []
    skipped: list[dict] = []
    n_filled = 0
    bar = tqdm(total=n, desc=f"preprocess {name}", unit="img", mininterval=1.0)
    pool = Pool(workers) if workers > 1 else None
    ok = False
    try:
        results = pool.imap(_load_chunk, chunks) if pool else map(_load_chunk, chunks)
        for chunk in results:
            for i, reason, digest, filled in chunk:
                if reason is not None:
                    skipped.append({"file": paths[i], "reason": reason})
                    continue
                kept.append(i)
                digests.append(digest)
                n_filled += filled
            bar.update(len(chunk))
        # the workers wrote row i of every image; close the gaps of the skipped ones (j <= i,
        # so copying front to back never overwrites a row still to be moved)
        for j, i in enumerate(kept):
            if i != j:
                images[j] = images[i]
                if mask_arr is not None:
                    mask_arr[j] = mask_arr[i]
        ok = True
    finally:
        bar.close()
        if pool:
            pool.terminate()
            pool.join()
        if not ok:  # interrupted: leave no half-written arrays behind
            del images, mask_arr
            for tmp in (tmp_img, tmp_mask):
                tmp.unlink(missing_ok=True)
    images.flush()
    del images
    if mask_arr is not None:
        mask_arr.flush()
        del mask_arr
    for tmp, final in ((tmp_img, img_path), (tmp_mask, mask_path)):
        if tmp.exists():
            if len(kept) < n:
                _shrink_npy(tmp, len(kept))
            os.replace(tmp, final)
    if not has_masks and mask_path.exists():
        mask_path.unlink()  # stale from an earlier run with masks
    df.iloc[kept].to_csv(out_dir / f"{name}.csv", index=False)
    seconds = time.perf_counter() - t0
    return {"name": name, "rows": n, "kept": len(kept), "skipped": skipped,
            "masks": has_masks, "corners_filled": n_filled, "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 1) if seconds > 0 else None,
            "digests": digests}


_TIMING = ("seconds", "images_per_s")  # of a run, not of its inputs: kept out of summary.json
DUPLICATE_COLUMNS = ["file", "split", "class", "duplicate_of", "duplicate_of_split",
                     "duplicate_of_class", "conflict"]


def find_duplicates(rows: list[dict]) -> list[dict]:
    """Rows (``split, file, class, digest``, in train/val/test then array order) whose bytes
    equal an earlier row's: one record per later copy, against the first occurrence."""
    first: dict[str, dict] = {}
    out = []
    for r in rows:
        orig = first.setdefault(r["digest"], r)
        if orig is r:
            continue
        out.append({"file": r["file"], "split": r["split"], "class": r["class"],
                    "duplicate_of": orig["file"], "duplicate_of_split": orig["split"],
                    "duplicate_of_class": orig["class"], "conflict": r["class"] != orig["class"]})
    return out


def preprocess_all(splits_dir: Path, out_dir: Path, size: int, workers: int = 0,
                   corners: bool = False, timing_file: Path | None = None) -> dict:
    """Preprocess ``{train,val,test}.csv`` of ``splits_dir`` into ``out_dir``.

    Writes the per-split files, ``skipped.csv`` (``file, reason``) and ``summary.json`` (counts
    per split and skipped: a function of the inputs, so that ``out_dir``'s hash changes only
    when its content does); the seconds and images/s go to ``timing_file`` (a metrics file of
    the stage, which no stage reads). Returns the summary with the timings.
    """
    splits_dir, out_dir = Path(splits_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict = {"image_size": size, "fill_corners": corners, "splits": {}}
    skipped: list[dict] = []
    kept_rows: list[dict] = []
    total = 0
    for name in _SPLITS:
        df = pd.read_csv(splits_dir / f"{name}.csv", dtype={"patient": str, "mask": str},
                         keep_default_na=False)
        info = preprocess_split(df, size, out_dir, name, workers, corners)
        kept = pd.read_csv(out_dir / f"{name}.csv", dtype=str, keep_default_na=False)
        classes = kept["class"] if "class" in kept.columns else [""] * len(kept)
        kept_rows += [{"split": name, "file": f, "class": c, "digest": d}
                      for f, c, d in zip(kept["path"], classes, info.pop("digests"))]
        skipped += info.pop("skipped")
        info["skipped"] = info["rows"] - info["kept"]
        summary["splits"][name] = info
        total += info["rows"]
    pd.DataFrame(skipped, columns=["file", "reason"]).to_csv(out_dir / "skipped.csv", index=False)
    dups = find_duplicates(kept_rows)
    pd.DataFrame(dups, columns=DUPLICATE_COLUMNS).to_csv(out_dir / "duplicates.csv", index=False)
    conflicts = sum(d["conflict"] for d in dups)
    if dups:
        print(f"[preprocess] warning: {len(dups)} duplicate files (same bytes as another listed "
              f"file), {conflicts} with a different class than their original; all kept with "
              f"their own labels, listed in {out_dir / 'duplicates.csv'}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    summary.update(images=total, skipped=len(skipped),
                   duplicates={"files": len(dups),
                               "across_splits": sum(d["split"] != d["duplicate_of_split"]
                                                    for d in dups),
                               "label_conflicts": conflicts},
                   seconds=round(seconds, 3),
                   images_per_s=round(total / seconds, 1) if seconds > 0 else None)
    timing = {"seconds": summary["seconds"], "images_per_s": summary["images_per_s"],
              "splits": {k: {t: v[t] for t in _TIMING} for k, v in summary["splits"].items()}}
    stable = {k: v for k, v in summary.items() if k not in _TIMING}
    stable["splits"] = {k: {t: x for t, x in v.items() if t not in _TIMING}
                        for k, v in summary["splits"].items()}
    (out_dir / "summary.json").write_text(json.dumps(stable, indent=2) + "\n")
    if timing_file is not None:
        Path(timing_file).parent.mkdir(parents=True, exist_ok=True)
        Path(timing_file).write_text(json.dumps(timing, indent=2) + "\n")
    return summary


def fill_variant(raw_dir: Path, out_dir: Path) -> dict:
    """The ``filled`` variant of the arrays in ``raw_dir`` (made by :func:`preprocess_all` with
    ``corners`` off), written to ``out_dir``: every image through :func:`fill_corners`, the
    CSVs and masks copied. Byte-identical to decoding with ``corners`` on (the fill acts on the
    resized uint8 image either way), without decoding twice. Returns its ``summary.json``."""
    import shutil

    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = json.loads((raw_dir / "summary.json").read_text())
    summary["fill_corners"] = True
    for name in _SPLITS:
        src = np.load(raw_dir / f"{name}.npy", mmap_mode="r")
        tmp = out_dir / f".{name}.npy.tmp"
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=src.shape)
        n_filled = 0
        for i in range(len(src)):
            image = np.asarray(src[i, 0])
            filled = fill_corners(image)
            dst[i, 0] = filled
            n_filled += filled is not image
        dst.flush()
        del dst, src
        os.replace(tmp, out_dir / f"{name}.npy")
        summary["splits"][name]["corners_filled"] = int(n_filled)
        for extra in (f"{name}.csv", f"{name}_masks.npy"):
            target = out_dir / extra
            if (raw_dir / extra).exists():
                shutil.copyfile(raw_dir / extra, target)
            elif target.exists():
                target.unlink()  # stale from an earlier run with masks
    for extra in ("skipped.csv", "duplicates.csv"):
        shutil.copyfile(raw_dir / extra, out_dir / extra)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def preprocess_variants(splits_dir: Path, out_dir: Path, size: int, workers: int = 0,
                        timing_file: Path | None = None) -> dict[str, dict]:
    """The preprocess stage: every variant of :data:`sparsegan.layout.VARIANTS` into
    ``out_dir/<variant>`` (``raw`` decoded by :func:`preprocess_all`, ``filled`` derived from
    it by :func:`fill_variant`), one DVC output each, so that each model reads the variant its
    ``preprocess.variant.<model>`` names and a model of the other variant never re-runs for it.
    Returns each variant's summary; the timings go to ``timing_file``."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    raw = preprocess_all(splits_dir, out_dir / "raw", size, workers, corners=False,
                         timing_file=timing_file)
    t1 = time.perf_counter()
    filled = fill_variant(out_dir / "raw", out_dir / "filled")
    if timing_file is not None:
        timing = json.loads(Path(timing_file).read_text())
        timing.update(fill_seconds=round(time.perf_counter() - t1, 3),
                      total_seconds=round(time.perf_counter() - t0, 3))
        Path(timing_file).write_text(json.dumps(timing, indent=2) + "\n")
    return {"raw": raw, "filled": filled}
