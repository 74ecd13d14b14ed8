"""Point 4, inputs: messy image folders through ``preprocess_all`` on split CSVs made here. Each
file gets its stated policy (sparsegan/data/preprocess.py): converted to 8-bit grayscale, or
skipped and listed with a reason; never a crash, and never a changed label (duplicates are kept
with their own labels and listed, a conflicting class is flagged)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from sparsegan.data.preprocess import preprocess_all

SIZE = 32


def _gradient(w: int = 64, h: int = 48) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width x height`` (8-bit gray) with a few bytes of data: a
    decompression bomb's header, without allocating anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _jpeg_claiming(path: Path, src: Path, width: int, height: int) -> None:
    """A small JPEG whose frame header (SOF0) is patched to claim ``width x height``."""
    data = bytearray(src.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))


def _make_inputs(raw: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (file, expected skip reason or None when it must be converted and kept)."""
    raw.mkdir()
    g = _gradient()
    files: dict[str, tuple[Path, str | None]] = {}

    def img(name: str, image: Image.Image, reason: str | None = None, **kw) -> Path:
        path = raw / name
        image.save(path, **kw)
        files[name] = (path, reason)
        return path

    def raw_file(name: str, data: bytes, reason: str) -> Path:
        path = raw / name
        path.write_bytes(data)
        files[name] = (path, reason)
        return path

    gray = img("gray.jpeg", Image.fromarray(g), quality=95)
    img("rgb.jpeg", Image.fromarray(np.stack([g, g // 2, 255 - g], -1)))
    img("rgba.png", Image.fromarray(np.stack([g, g, g, 255 - g], -1)))
    img("cmyk.jpeg", Image.fromarray(np.stack([g, g, g], -1)).convert("CMYK"))
    img("palette.png", Image.fromarray(g).convert("P"))
    img("la.png", Image.fromarray(np.stack([g, np.full_like(g, 200)], -1), mode="LA"))
    img("bilevel.png", Image.fromarray(g).convert("1"))
    img("sixteen_bit.png", Image.fromarray(
        (1000 + 4000 * np.linspace(0, 1, 64 * 48).reshape(48, 64)).astype(np.uint16)))
    img("flat_sixteen_bit.png", Image.fromarray(np.full((48, 64), 3000, np.uint16)))
    img("float32.tiff", Image.fromarray(np.linspace(-1, 1, 64 * 48, dtype=np.float32)
                                        .reshape(48, 64)))
    img("animated.gif", Image.fromarray(g), save_all=True,
        append_images=[Image.fromarray(255 - g)])
    img("name with spaces é.png", Image.fromarray(g))
    img("tiny.png", Image.fromarray(g[:8, :8]), "too small (8x8)")
    img("sliver.png", Image.fromarray(np.zeros((4, 2000), np.uint8)), "too small (2000x4)")
    jpeg = gray.read_bytes()
    raw_file("truncated.jpeg", jpeg[: len(jpeg) // 2], "truncated image")
    raw_file("zero_bytes.jpeg", b"", "empty file (0 bytes)")
    raw_file("text.jpeg", b"this is not an image\n" * 10, "not an image")
    raw_file("html.png", b"<html><body>404 Not Found</body></html>", "not an image")
    raw_file("random.jpeg", np.random.default_rng(0).bytes(4096), "not an image")
    _png_header_only(raw / "bomb_30000x30000.png", 30000, 30000)
    files["bomb_30000x30000.png"] = (raw / "bomb_30000x30000.png", "decompression bomb")
    _png_header_only(raw / "bomb_12000x12000.png", 12000, 12000)  # above 100 MP, below 2x
    files["bomb_12000x12000.png"] = (raw / "bomb_12000x12000.png", "decompression bomb")
    _jpeg_claiming(raw / "bomb_60000x60000.jpeg", gray, 60000, 60000)
    files["bomb_60000x60000.jpeg"] = (raw / "bomb_60000x60000.jpeg", "decompression bomb")
    (raw / "a_folder.jpeg").mkdir()
    files["a_folder.jpeg"] = (raw / "a_folder.jpeg", "not a regular file")
    os.mkfifo(raw / "fifo.jpeg")  # opening it would block forever
    files["fifo.jpeg"] = (raw / "fifo.jpeg", "not a regular file")
    files["missing.jpeg"] = (raw / "missing.jpeg", "missing file")
    # duplicates: the same bytes under other names, one of them listed with another class
    shutil.copyfile(gray, raw / "copy_of_gray.jpeg")
    files["copy_of_gray.jpeg"] = (raw / "copy_of_gray.jpeg", None)
    shutil.copyfile(gray, raw / "copy_of_gray_as_cnv.jpeg")
    files["copy_of_gray_as_cnv.jpeg"] = (raw / "copy_of_gray_as_cnv.jpeg", None)
    return files


def _row(path: Path, cls: str, patient: str) -> dict:
    return {"path": str(path), "label": int(cls != "NORMAL"), "class": cls, "patient": patient,
            "mask": ""}


def test_messy_inputs_each_get_their_stated_policy(tmp_path, guard, ledger, capsys):
    files = _make_inputs(tmp_path / "raw")
    good = [n for n, (_, reason) in files.items() if reason is None]
    bad = [n for n, (_, reason) in files.items() if reason is not None]
    # train: the normal scans that must be kept (incl. gray.jpeg and its copy); val and test:
    # the bad files, a kept one each, and in test a copy of gray.jpeg labelled CNV
    train = [_row(files[n][0], "NORMAL", f"p{i}") for i, n in enumerate(good)
             if n not in ("name with spaces é.png", "animated.gif", "copy_of_gray_as_cnv.jpeg")]
    val = [_row(files["name with spaces é.png"][0], "NORMAL", "v")] + [
        _row(files[n][0], ("NORMAL", "DME")[i % 2], f"v{i}") for i, n in enumerate(bad[0::2])]
    test = [_row(files["animated.gif"][0], "DME", "t")] + [
        _row(files[n][0], "DRUSEN", f"t{i}") for i, n in enumerate(bad[1::2])]
    test.append(_row(files["copy_of_gray_as_cnv.jpeg"][0], "CNV", "t99"))
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, rows in (("train", train), ("val", val), ("test", test)):
        pd.DataFrame(rows).to_csv(splits / f"{name}.csv", index=False)
    guard.protect(tmp_path / "raw", splits)
    ledger.inputs(len(files))
    assert len(train) + len(val) + len(test) == len(files)

    out = tmp_path / "processed"
    summary = preprocess_all(splits, out, SIZE, workers=2)

    # every skip has its stated reason; everything else was converted and kept
    skipped = pd.read_csv(out / "skipped.csv", keep_default_na=False)
    reasons = dict(zip(skipped["file"], skipped["reason"]))
    for name, (path, reason) in files.items():
        if reason is None:
            assert str(path) not in reasons, (name, reasons.get(str(path)))
        else:
            assert reasons.get(str(path), "").startswith(reason), (name, reasons.get(str(path)))
    n_skip = sum(r is not None for _, r in files.values())
    assert summary["skipped"] == len(skipped) == n_skip
    assert summary["images"] == len(files)

    # labels: the kept rows are the input rows, in order, with their labels untouched
    for name, rows in (("train", train), ("val", val), ("test", test)):
        kept = pd.read_csv(out / f"{name}.csv", dtype=str, keep_default_na=False)
        expected = pd.DataFrame([r for r in rows if r["path"] not in reasons], dtype=str,
                                columns=["path", "label", "class"])
        assert kept[["path", "label", "class"]].values.tolist() == \
            expected[["path", "label", "class"]].values.tolist()
        arr = np.load(out / f"{name}.npy", mmap_mode="r")
        assert arr.shape == (len(kept), 1, SIZE, SIZE) and arr.dtype == np.uint8

    # conversions: 16-bit stretched from its own range, a flat one is black, RGB is luma
    train_kept = pd.read_csv(out / "train.csv", keep_default_na=False)["path"].tolist()
    train_arr = np.load(out / "train.npy")
    by_name = {Path(p).name: train_arr[i, 0] for i, p in enumerate(train_kept)}
    assert by_name["sixteen_bit.png"].min() <= 5 and by_name["sixteen_bit.png"].max() >= 250
    assert by_name["flat_sixteen_bit.png"].max() == 0
    assert by_name["float32.tiff"].min() <= 5 and by_name["float32.tiff"].max() >= 250
    # alpha = 255 - g composited on black: darker than the opaque image
    assert by_name["rgba.png"].astype(int).mean() < by_name["gray.jpeg"].astype(int).mean() - 20
    assert np.abs(by_name["gray.jpeg"].astype(int) - by_name["copy_of_gray.jpeg"]).max() == 0

    # duplicates: kept, listed, the class conflict flagged (and warned about)
    dups = pd.read_csv(out / "duplicates.csv", keep_default_na=False)
    gray = str(files["gray.jpeg"][0])
    assert set(dups["file"]) == {str(files["copy_of_gray.jpeg"][0]),
                                 str(files["copy_of_gray_as_cnv.jpeg"][0])}
    assert set(dups["duplicate_of"]) == {gray}
    conflict = dups[dups["conflict"].astype(str) == "True"]
    assert conflict["file"].tolist() == [str(files["copy_of_gray_as_cnv.jpeg"][0])]
    assert conflict[["class", "duplicate_of_class"]].values.tolist() == [["CNV", "NORMAL"]]
    assert summary["duplicates"]["files"] == 2 and summary["duplicates"]["label_conflicts"] == 1
    assert json.loads((out / "summary.json").read_text())["duplicates"] == summary["duplicates"]
    assert "1 with a different class" in capsys.readouterr().err
