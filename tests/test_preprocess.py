"""Image loading policy, the preprocessed arrays, and reading them back (dataset.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sparsegan.data import preprocess as pp
from sparsegan.data.dataset import ArrayDataset, iterate_batches, load_split, to_float
from sparsegan.data.preprocess import SkipImage, load_gray, preprocess_all, preprocess_split


def half_white(w: int = 64, h: int = 64) -> np.ndarray:
    a = np.zeros((h, w), np.uint8)
    a[:, : w // 2] = 255
    return a


def save(a: np.ndarray, path, **kw) -> str:
    Image.fromarray(a).save(path, **kw)
    return str(path)


def check_half_white(out: np.ndarray, tol: int = 0, blended: bool = True) -> None:
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert np.all(out[:, :6] >= 255 - tol)
    assert np.all(out[:, 10:] <= tol)
    assert np.all(np.abs(out.astype(int) - out[0].astype(int)) <= max(tol, 0))  # rows alike
    # the edge is blended symmetrically: columns 7 and 8 add up to white
    if not blended:  # JPEG DCT scaling to exactly 16 px: the edge is block-aligned, crisp
        return
    assert abs(int(out[0, 7]) + int(out[0, 8]) - 255) <= 2 * tol + 1
    assert 0 < out[0, 7] < 255 and 0 < out[0, 8] < 255


def test_known_image_resizes_to_expected_values(tmp_path):
    check_half_white(load_gray(save(half_white(), tmp_path / "a.png"), 16))


def test_jpeg_draft_path_matches_full_decode(tmp_path):
    # 512x496 is reduced by the JPEG decoder (scale 1/8 -> 64x62) before the resize to 16
    big = np.repeat(np.repeat(half_white(64, 62), 8, axis=1), 8, axis=0)
    assert big.shape == (496, 512)
    out = load_gray(save(big, tmp_path / "a.jpeg", quality=95), 16)
    check_half_white(out, tol=6)
    ref = np.asarray(Image.fromarray(big).resize((16, 16), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 6


def test_rgb_jpeg_becomes_luma(tmp_path):
    a = np.zeros((64, 64, 3), np.uint8)
    a[...] = (200, 100, 50)
    out = load_gray(save(a, tmp_path / "rgb.jpg", quality=95), 32)
    assert out.shape == (32, 32)
    assert abs(float(out.mean()) - 124.2) <= 3  # 0.299 R + 0.587 G + 0.114 B


def test_16bit_png_scaled_by_range(tmp_path):
    a = np.zeros((64, 64), np.uint16)
    for q, v in enumerate((0, 1365, 2730, 4095)):  # 12-bit data in a 16-bit PNG
        a[:, 16 * q:16 * (q + 1)] = v
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_gray(path, 16)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.all(out[:, 1:3] == 0) and np.all(out[:, 13:15] == 255)
    assert np.all(np.abs(out[:, 5:7].astype(int) - 85) <= 1)
    assert np.all(np.abs(out[:, 9:11].astype(int) - 170) <= 1)


def test_rgba_composited_on_black(tmp_path):
    a = np.zeros((64, 64, 4), np.uint8)
    a[...] = (200, 100, 50, 128)
    a[:, 32:, 3] = 0  # right half fully transparent -> black
    out = load_gray(save(a, tmp_path / "rgba.png"), 16)
    assert np.all(np.abs(out[:, :6].astype(int) - round(124.2 * 128 / 255)) <= 1)
    assert np.all(out[:, 10:] == 0)


def test_cmyk_p_la_1_modes(tmp_path):
    white_left = half_white()
    cmyk = np.zeros((64, 64, 4), np.uint8)
    cmyk[:, 32:, 3] = 255  # K=255 on the right: black; nothing on the left: white
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    # 64 px JPEG at 16: decoded at 1/4 scale by draft(), no resize left to blend the edge
    check_half_white(load_gray(tmp_path / "cmyk.jpg", 16), tol=6, blended=False)

    Image.fromarray(white_left).convert("P").save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    check_half_white(load_gray(tmp_path / "p.png", 16))

    la = Image.merge("LA", [Image.fromarray(white_left), Image.new("L", (64, 64), 255)])
    la.save(tmp_path / "la.png")
    check_half_white(load_gray(tmp_path / "la.png", 16))

    Image.fromarray(white_left).convert("1").save(tmp_path / "bw.png")
    check_half_white(load_gray(tmp_path / "bw.png", 16))


def _write_bad_files(tmp_path) -> dict[str, str]:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    good = save(noise, tmp_path / "good.jpeg", quality=90)
    data = open(good, "rb").read()
    (tmp_path / "truncated.jpeg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpeg").write_bytes(b"")
    (tmp_path / "text.jpeg").write_text("this is not an image\n")
    save(np.zeros((16, 40), np.uint8), tmp_path / "tiny.png")
    return {"truncated": str(tmp_path / "truncated.jpeg"), "empty": str(tmp_path / "empty.jpeg"),
            "text": str(tmp_path / "text.jpeg"), "tiny": str(tmp_path / "tiny.png"),
            "missing": str(tmp_path / "missing.jpeg")}


def test_bad_files_raise_skip_with_reason(tmp_path, monkeypatch):
    bad = _write_bad_files(tmp_path)
    reasons = {}
    for key, path in bad.items():
        with pytest.raises(SkipImage) as info:
            load_gray(path, 16)
        reasons[key] = str(info.value)
    assert "truncated" in reasons["truncated"]
    assert "empty" in reasons["empty"]
    assert reasons["text"] == "not an image"
    assert reasons["tiny"] == "too small (40x16)"
    assert reasons["missing"] == "missing file"
    # decompression bomb: lower the limits instead of writing a 100 MP file
    monkeypatch.setattr(pp, "MAX_PIXELS", 100 * 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(SkipImage, match="decompression bomb"):
        load_gray(tmp_path / "good.jpeg", 16)  # 128x128 > 100x100 (warning -> error)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)
    with pytest.raises(SkipImage, match="decompression bomb"):
        load_gray(tmp_path / "good.jpeg", 16)  # > 2x the limit: Pillow's own error


@pytest.mark.parametrize("workers", [1, 3])
def test_preprocess_split_skips_and_keeps_order(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(pp, "CHUNK", 2)  # several chunks, so the pool's ordering is exercised
    bad = _write_bad_files(tmp_path)
    rows = []
    values = []
    for k in range(7):
        v = 20 * (k + 1)
        rows.append(save(np.full((48, 40), v, np.uint8), tmp_path / f"g{k}.png"))
        values.append(v)
        rows.append(list(bad.values())[k % len(bad)])
    df = pd.DataFrame({"path": rows, "label": 0, "class": "NORMAL", "patient": "1",
                       "mask": ""})
    out = tmp_path / "processed"
    info = preprocess_split(df, 16, out, "train", workers)
    assert info["rows"] == 14 and info["kept"] == 7
    arr = np.load(out / "train.npy", mmap_mode="r")
    assert isinstance(arr, np.memmap)
    assert arr.shape == (7, 1, 16, 16) and arr.dtype == np.uint8
    assert [int(a.mean()) for a in arr] == values  # array order = input order
    assert np.all(arr == np.array(values, np.uint8)[:, None, None, None])
    kept = pd.read_csv(out / "train.csv")
    assert kept["path"].tolist() == rows[0::2]
    skipped = pd.DataFrame(info["skipped"])
    assert skipped["file"].tolist() == rows[1::2]
    assert all(skipped["reason"].str.len() > 0)
    assert not (out / "train_masks.npy").exists()
    assert not list(out.glob(".*tmp"))


def test_preprocess_masks_nearest(tmp_path):
    img = save(half_white(), tmp_path / "img.png")
    m255 = np.zeros((64, 64), np.uint8)
    m255[:, :32] = 255  # lesion on the left half, stored as 0/255
    m01 = (np.random.default_rng(1).random((64, 64)) < 0.3).astype(np.uint8)  # stored as 0/1
    df = pd.DataFrame({"path": [img, img, img, str(tmp_path / "missing.png")],
                       "label": [1, 1, 0, 1], "class": ["CNV", "DME", "NORMAL", "CNV"],
                       "patient": ["1", "2", "3", "4"],
                       "mask": [save(m255, tmp_path / "m1.png"), save(m01, tmp_path / "m2.png"),
                                "", save(m01, tmp_path / "m3.png")]})
    out = tmp_path / "processed"
    info = preprocess_split(df, 16, out, "test", 1)
    assert info["kept"] == 3 and info["masks"]
    masks = np.load(out / "test_masks.npy", mmap_mode="r")
    images = np.load(out / "test.npy", mmap_mode="r")
    assert masks.shape == images.shape == (3, 1, 16, 16) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    assert np.all(masks[0, 0, :, :8] == 1) and np.all(masks[0, 0, :, 8:] == 0)
    expected = np.asarray(Image.fromarray(m01).resize((16, 16), Image.Resampling.NEAREST))
    assert np.array_equal(masks[1, 0], expected) and masks[1].sum() > 0
    assert masks[2].sum() == 0  # row without a mask
    # re-running without masks removes the stale masks file
    preprocess_split(df.assign(mask="").iloc[:1], 16, out, "test", 1)
    assert not (out / "test_masks.npy").exists()


def test_preprocess_all_and_dataset(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    bad = _write_bad_files(tmp_path)
    for name, n in (("train", 5), ("val", 3), ("test", 4)):
        paths = [save(np.full((40, 50), 10 * k, np.uint8), tmp_path / f"{name}{k}.png")
                 for k in range(n)]
        labels = [0] * n if name == "train" else [k % 2 for k in range(n)]
        if name == "val":
            paths.append(bad["empty"])
            labels.append(1)
        pd.DataFrame({"path": paths, "label": labels, "class": "NORMAL", "patient": "7",
                      "mask": ""}).to_csv(splits / f"{name}.csv", index=False)
    out = tmp_path / "processed"
    summary = preprocess_all(splits, out, 32, workers=2, timing_file=tmp_path / "run.json")
    assert summary["image_size"] == 32 and summary["images"] == 13 and summary["skipped"] == 1
    assert summary["splits"]["val"]["kept"] == 3 and summary["splits"]["val"]["skipped"] == 1
    assert summary["images_per_s"] > 0
    # the timings are the run's, kept out of the output (whose hash must follow its content)
    timing = json.loads((tmp_path / "run.json").read_text())
    assert timing["images_per_s"] == summary["images_per_s"] and "val" in timing["splits"]
    written = json.loads((out / "summary.json").read_text())
    assert "seconds" not in written and "images_per_s" not in written
    assert "seconds" not in written["splits"]["val"] and written["splits"]["val"]["kept"] == 3
    first = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    preprocess_all(splits, out, 32, workers=2)
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == first  # byte-identical
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped.columns.tolist() == ["file", "reason"]
    assert skipped["file"].tolist() == [bad["empty"]]

    images, index, masks = load_split(out, "test")
    assert images.shape == (4, 1, 32, 32) and masks is None
    assert index["label"].tolist() == [0, 1, 0, 1]
    assert index["patient"].tolist() == ["7"] * 4

    ds = ArrayDataset.from_split(out, "test", with_labels=True)
    assert len(ds) == 4
    x, y = ds[3]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and int(y) == 1
    assert torch.allclose(x, torch.full_like(x, 30 / 127.5 - 1))
    import pickle
    ds2 = pickle.loads(pickle.dumps(ArrayDataset(out / "test.npy")))
    assert ds2._images is None and torch.equal(ds2[0], ds[0][0])


def test_iterate_batches():
    images = np.arange(10, dtype=np.uint8).repeat(4).reshape(10, 1, 2, 2) * 20
    batches = list(iterate_batches(images, 4, shuffle=False))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    x = torch.cat(batches)
    assert x.dtype == torch.float32 and x.min() == -1 and torch.allclose(x, to_float(images))
    assert list(iterate_batches(images, 4, drop_last=True))[-1].shape[0] == 4
    assert len(list(iterate_batches(images, 4, drop_last=True))) == 2
    g = torch.Generator().manual_seed(0)
    seen = [idx for _, idx in iterate_batches(images, 3, True, g, return_index=True)]
    allidx = np.concatenate(seen)
    assert sorted(allidx.tolist()) == list(range(10))  # each row once
    assert all(np.all(np.diff(s) > 0) for s in seen)  # sorted within a batch
    again = [idx for _, idx in iterate_batches(images, 3, True, torch.Generator().manual_seed(0),
                                              return_index=True)]
    assert all(np.array_equal(a, b) for a, b in zip(seen, again))
    assert not np.array_equal(allidx, np.arange(10))
    for xb, idx in iterate_batches(images, 3, True, g, return_index=True):
        assert torch.equal(xb, to_float(images[idx]))
    assert float(to_float(np.array([0, 255], np.uint8)).max()) == 1.0


def scan_with_wedge(wedge: bool = True, seed: int = 0) -> np.ndarray:
    """64x64 'B-scan': dark noisy vitreous/choroid (~30), a saturated RPE band on rows 40-41
    that runs into the left and right edges, and (``wedge``) a white registration wedge in the
    top-left corner whose slanted edge is antialiased."""
    rng = np.random.default_rng(seed)
    a = rng.normal(30, 4, (64, 64)).clip(0, 255)
    a[40:42] = 255
    if wedge:
        rows, cols = np.mgrid[0:64, 0:64]
        depth = 12.0 - cols * 0.4  # the wedge's bottom edge, 12 px deep at the corner
        a = np.where(rows < depth - 0.5, 255, a)
        edge = np.abs(rows - depth) <= 0.5
        a[edge] = 150  # partly covered pixels
    return a.astype(np.uint8)


def test_fill_corners_replaces_the_wedge_by_row_background_and_keeps_the_retina():
    img = scan_with_wedge()
    out = pp.fill_corners(img)
    wedge = (img >= 128) & (np.arange(64)[:, None] < 20)
    assert wedge.sum() > 100
    assert np.all(out[wedge] < 50) and np.all(out[wedge] > 15)  # background, not black or white
    assert np.array_equal(out[20:], img[20:])  # the saturated RPE touching the sides is kept
    assert np.array_equal(out[:, 40:][~wedge[:, 40:]], img[:, 40:][~wedge[:, 40:]])
    clean = scan_with_wedge(wedge=False)
    assert pp.fill_corners(clean) is clean  # nothing to fill: the same array back
    # saturated tissue touching the top edge in the middle (not near a corner) is not a wedge
    mid = clean.copy()
    mid[0:10, 28:36] = 255
    assert pp.fill_corners(mid) is mid


def test_preprocess_fills_corners_only_when_asked_and_counts_them(tmp_path):
    paths = [save(scan_with_wedge(), tmp_path / "w.png"),
             save(scan_with_wedge(wedge=False), tmp_path / "c.png")]
    df = pd.DataFrame({"path": paths, "label": 0, "class": "NORMAL", "patient": ["1", "2"],
                       "mask": ""})
    off = preprocess_split(df, 32, tmp_path / "off", "train", 1)
    on = preprocess_split(df, 32, tmp_path / "on", "train", 1, corners=True)
    assert off["corners_filled"] == 0 and on["corners_filled"] == 1
    a_off = np.load(tmp_path / "off" / "train.npy")
    a_on = np.load(tmp_path / "on" / "train.npy")
    assert a_off[0, 0, 0, 0] == 255 and a_on[0, 0, 0, 0] < 60
    assert np.array_equal(a_on[1], a_off[1])
    assert np.array_equal(load_gray(paths[0], 32, corners=True), a_on[0, 0])  # predict's path


def test_the_stage_makes_both_variants_and_filled_equals_decoding_with_corners_on(tmp_path):
    """data/processed/{raw,filled}: filled is derived from raw's arrays, byte for byte what
    decoding with the corners filled gives; the CSVs, masks and skip list are raw's."""
    from sparsegan.data.preprocess import preprocess_variants

    paths = [save(scan_with_wedge(), tmp_path / "w.png"),
             save(scan_with_wedge(wedge=False), tmp_path / "c.png")]
    splits = tmp_path / "splits"
    splits.mkdir()
    for name in ("train", "val", "test"):
        pd.DataFrame({"path": paths + [str(tmp_path / "missing.png")], "label": 0,
                      "class": "NORMAL", "patient": ["1", "2", "3"], "mask": ""}
                     ).to_csv(splits / f"{name}.csv", index=False)
    out = tmp_path / "processed"
    summaries = preprocess_variants(splits, out, 32, workers=1, timing_file=tmp_path / "t.json")
    preprocess_all(splits, tmp_path / "decoded_filled", 32, workers=1, corners=True)
    for name in ("train", "val", "test"):
        raw, filled = (np.load(out / v / f"{name}.npy") for v in ("raw", "filled"))
        assert raw.shape == (2, 1, 32, 32) and raw[0, 0, 0, 0] == 255 and filled[0, 0, 0, 0] < 60
        assert np.array_equal(raw[1], filled[1])  # nothing to fill: unchanged
        assert (out / "filled" / f"{name}.npy").read_bytes() == \
            (tmp_path / "decoded_filled" / f"{name}.npy").read_bytes()
        assert (out / "filled" / f"{name}.csv").read_bytes() == (out / "raw" / f"{name}.csv").read_bytes()
        assert summaries["filled"]["splits"][name]["corners_filled"] == 1
    assert summaries["raw"]["fill_corners"] is False and summaries["filled"]["fill_corners"] is True
    assert len(pd.read_csv(out / "filled" / "skipped.csv")) == 3  # the missing file, per split
    timing = json.loads((tmp_path / "t.json").read_text())
    assert timing["total_seconds"] >= timing["fill_seconds"] >= 0
    assert "seconds" not in json.loads((out / "filled" / "summary.json").read_text())


def test_jpeg_grain_does_not_depend_on_whether_the_height_divides_exactly(tmp_path):
    """A 512x512 JPEG is DCT-scaled to exactly 64 px and would skip the antialiased resize that
    smooths a 512x496 one (62 px, upsampled): the same texture must come out equally grainy."""
    rng = np.random.default_rng(3)
    noise = rng.normal(90, 25, (512, 512)).clip(0, 255).astype(np.uint8)

    def grain(h: int) -> float:
        path = tmp_path / f"n{h}.jpeg"
        Image.fromarray(noise[:h]).save(path, quality=92)
        a = load_gray(path, 64).astype(np.float32)
        return float(np.abs(np.diff(a, axis=0)).mean())

    g512, g496 = grain(512), grain(496)
    assert 0.75 < g512 / g496 < 1.33, (g512, g496)
