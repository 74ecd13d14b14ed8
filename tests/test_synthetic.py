"""The embedded synthetic OCT generator: masks, class contrasts, determinism, OCT2017 layout."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sparsegan.data import synthetic
from sparsegan.params import CLASSES, DISEASES, SyntheticParams

H, W = 124, 128  # small scans keep the tests fast
NAME = re.compile(r"^(NORMAL|CNV|DME|DRUSEN)-\d+-\d+\.jpeg$")


def render(cls: str, k: int, h: int = H, w: int = W) -> synthetic.Render:
    return synthetic.render_scan(np.random.default_rng([k, 42]), cls, h, w, with_reference=True)


@pytest.mark.parametrize("cls", CLASSES)
def test_generate_scan_shapes_and_masks(cls):
    for k in range(6):
        img, mask = synthetic.generate_scan(np.random.default_rng(k), cls, H, W)
        assert img.dtype == np.uint8 and img.shape == (H, W)
        assert mask.dtype == bool and mask.shape == (H, W)
        if cls == "NORMAL":
            assert not mask.any()
        else:
            assert mask.any(), f"{cls} scan {k} has an empty lesion mask"
            assert mask.mean() < 0.5


def test_generate_scan_is_deterministic_and_seed_dependent():
    a = synthetic.generate_scan(np.random.default_rng(5), "CNV", H, W)
    b = synthetic.generate_scan(np.random.default_rng(5), "CNV", H, W)
    c = synthetic.generate_scan(np.random.default_rng(6), "CNV", H, W)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_with_reference_does_not_change_the_scan():
    plain = synthetic.render_scan(np.random.default_rng(3), "DME", H, W)
    ref = synthetic.render_scan(np.random.default_rng(3), "DME", H, W, with_reference=True)
    assert np.array_equal(plain.image, ref.image) and np.array_equal(plain.mask, ref.mask)


@pytest.mark.parametrize("cls", DISEASES)
def test_lesion_changes_the_image_only_inside_its_mask(cls):
    """The healthy twin (same anatomy, same noise, no lesion) differs from the scan in the mask."""
    for k in range(8):
        r = render(cls, k)
        diff = np.abs(r.image.astype(int) - r.reference.astype(int))
        assert diff[r.mask].mean() > 3 * max(diff[~r.mask].mean(), 0.01)
        assert diff[r.mask].sum() >= 0.97 * diff.sum()
        assert diff[~r.mask].max() <= 4  # sub-threshold changes only (e.g. a 0.1 px shift)


def test_normal_reference_is_itself():
    r = render("NORMAL", 0)
    assert np.array_equal(r.image, r.reference) and not r.mask.any() and r.parts == {}


def _mean_change(cls: str, part: str, n: int = 10) -> float:
    """Mean (scan - healthy twin) over the pixels of a lesion component, pooled over n scans."""
    total, count = 0.0, 0
    for k in range(n):
        r = render(cls, k, 248, 256)
        m = r.parts.get(part)
        if m is not None and m.any():
            total += (r.image.astype(float) - r.reference)[m].sum()
            count += int(m.sum())
    assert count > 0, f"no {part} pixels in {n} {cls} scans"
    return total / count


def test_classes_change_intensity_the_way_real_lesions_do():
    assert _mean_change("DME", "cyst") < -10  # hypo-reflective cysts
    assert _mean_change("CNV", "shrm") > 15  # hyper-reflective sub-retinal material
    assert _mean_change("DRUSEN", "elevation") > 15  # the bright RPE bulges up into the ONL


def test_dme_cysts_are_darker_than_the_retina_around():
    darker = 0
    for k in range(8):
        r = render("DME", k, 248, 256)
        cyst = r.parts["cyst"]
        around = r.mask & ~cyst & (r.reference > 40)  # retina in the lesion's span, not cyst
        if cyst.sum() > 5 and around.sum() > 5:
            darker += r.image[cyst].mean() < r.image[around].mean()
    assert darker >= 6


def test_severity_range_controls_lesion_size():
    def area(sev):
        return np.mean([synthetic.render_scan(np.random.default_rng([k, 9]), "DRUSEN", 248, 256,
                                              severity=sev).mask.sum() for k in range(8)])

    assert area((0.0, 0.15)) < area((0.85, 1.0))


def _params(tmp_seed: int = 0, **kw) -> SyntheticParams:
    base = dict(seed=tmp_seed, train_normal=5, train_per_disease=3, test_per_class=2,
                scans_per_patient=2, workers=1)
    base.update(kw)
    return SyntheticParams(**base)


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "synthetic"
    p = _params(7)
    df = synthetic.write_dataset(root, p)
    return root, p, df


def test_manifest_counts_names_and_paths(dataset):
    root, p, df = dataset
    assert list(df.columns) == ["path", "class", "patient", "official_split", "mask"]
    counts = df.groupby(["official_split", "class"]).size().to_dict()
    expected = {("train", "NORMAL"): p.train_normal}
    expected |= {("train", c): p.train_per_disease for c in DISEASES}
    expected |= {("test", c): p.test_per_class for c in CLASSES}
    assert counts == expected
    for row in df.to_dict("records"):
        img, mask = root.parent / row["path"], root.parent / row["mask"]
        assert row["path"] == f"{root.name}/{row['official_split']}/{row['class']}/{img.name}"
        assert row["mask"] == f"{root.name}/masks/{row['official_split']}/{row['class']}/{mask.name}"
        assert NAME.match(img.name) and img.name.split("-")[:2] == [row["class"], row["patient"]]
        assert re.fullmatch(r"\d{6,7}", row["patient"])
        assert mask.name == img.name.replace(".jpeg", ".png")
        im, mk = Image.open(img), Image.open(mask)
        assert im.mode == "L" and mk.mode == "L" and im.size == mk.size
        assert im.size in {(512, 496), (768, 496), (512, 512), (1536, 496)}
        m = np.asarray(mk)
        assert set(np.unique(m)) <= {0, 255}
        assert (m.max() == 0) == (row["class"] == "NORMAL")
    assert len(list(root.rglob("*.jpeg"))) == len(df) == len(list(root.rglob("*.png")))


def test_patients_one_class_few_scans_shared_size_and_disjoint_splits(dataset):
    root, p, df = dataset
    per = df.groupby("patient")
    assert (per["class"].nunique() == 1).all()
    assert (per["official_split"].nunique() == 1).all()
    assert (per.size() <= p.scans_per_patient).all()
    assert not set(df.patient[df.official_split == "train"]) & set(df.patient[df.official_split == "test"])
    for _, g in per:
        assert len({Image.open(root.parent / q).size for q in g.path}) == 1
    assert df.path.is_unique


def test_same_seed_same_bytes_any_workers_and_other_seed_differs(dataset, tmp_path):
    root, p, df = dataset
    again = synthetic.write_dataset(tmp_path / "a" / "synthetic", _params(7, workers=2))
    pd.testing.assert_frame_equal(df, again)
    assert _hashes(root) == _hashes(tmp_path / "a" / "synthetic")
    other = synthetic.write_dataset(tmp_path / "b" / "synthetic", _params(8))
    h1, h2 = _hashes(root), _hashes(tmp_path / "b" / "synthetic")
    assert set(df.patient) != set(other.patient)
    assert not set(h1.values()) & {v for k, v in h2.items() if k.endswith(".jpeg")}


def test_rewrite_replaces_stale_files(tmp_path):
    root = tmp_path / "synthetic"
    synthetic.write_dataset(root, _params(1, train_normal=6))
    df = synthetic.write_dataset(root, _params(1, train_normal=2))
    assert len(list(root.rglob("*.jpeg"))) == len(df)


def test_speckle_grain_has_a_physical_size_whatever_the_scan_width():
    """The same eye scanned at 512 and at 1536 columns (same field of view) must look equally
    grainy once resized to the model's size; a grain of fixed pixel size would average out 3x
    more in the wide scan and make the 512-column scans look anomalous."""
    def roughness(width: int) -> float:
        anat = synthetic.draw_anatomy(np.random.default_rng(11), 496, width)
        img = synthetic.render_scan(np.random.default_rng(12), "NORMAL", 496, width, anat).image
        small = np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BILINEAR,
                                                       reducing_gap=3.0), np.float32)
        return float(np.abs(np.diff(small[:16], axis=1)).mean())  # vitreous: speckle only

    r512, r1536 = roughness(512), roughness(1536)
    assert 0.75 < r1536 / r512 < 1.33, (r512, r1536)
