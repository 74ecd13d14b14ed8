"""Split protocols on a small fake OCT2017 manifest (no image files needed)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from sparsegan.data.split import COLUMNS, make_splits, write_splits
from sparsegan.params import CLASSES, ParamError, SplitParams

TRAIN_PATIENTS = 12  # per class
TRAIN_IMAGES = 5  # per patient and class
TEST_PATIENTS = 4  # per class, the first SHARED of them also in train
TEST_IMAGES = 3
SHARED = 2


def _pid(cls: str, k: int) -> str:
    return f"{CLASSES.index(cls) + 1}{k:03d}"


def fake_manifest() -> pd.DataFrame:
    """OCT2017-shaped: 12 train patients per class x 5 images, 4 test patients per class x 3
    images (2 of which also have train images); patient 1000 (NORMAL) also has DRUSEN images,
    so one patient spans two classes."""
    rows = []

    def add(split: str, cls: str, patient: str, n: int, mask: bool) -> None:
        for i in range(1, n + 1):
            name = f"{cls}-{patient}-{i}.jpeg"
            rows.append({"path": f"{split}/{cls}/{name}", "class": cls, "patient": patient,
                         "official_split": split,
                         "mask": f"masks/{name[:-5]}.png" if mask else ""})

    for cls in CLASSES:
        for k in range(TRAIN_PATIENTS):
            add("train", cls, _pid(cls, k), TRAIN_IMAGES, cls != "NORMAL")
        for k in range(TEST_PATIENTS):
            # test patients 0..SHARED-1 reuse train patient ids; the others are new (100+)
            pid = _pid(cls, k if k < SHARED else 100 + k)
            add("test", cls, pid, TEST_IMAGES, cls != "NORMAL")
    add("train", "DRUSEN", _pid("NORMAL", 0), 2, True)  # NORMAL patient 1000 with drusen too
    return pd.DataFrame(rows)


@pytest.fixture
def manifest() -> pd.DataFrame:
    return fake_manifest()


def _images(df: pd.DataFrame) -> set[str]:
    return set(df["path"])


def test_paper_counts_exact_and_disjoint(manifest, tmp_path):
    p = SplitParams(protocol="paper", val_normal=10, val_per_disease=8)
    s = make_splits(manifest, tmp_path / "raw", p, seed=0)
    assert set(s) == {"train", "val", "test"}
    for df in s.values():
        assert list(df.columns) == COLUMNS
    val_counts = s["val"]["class"].value_counts().to_dict()
    assert val_counts == {"NORMAL": 10, "CNV": 8, "DME": 8, "DRUSEN": 8}
    n_normal_train = TRAIN_PATIENTS * TRAIN_IMAGES
    assert len(s["train"]) == n_normal_train - 10
    assert set(s["train"]["class"]) == {"NORMAL"}
    assert (s["train"]["label"] == 0).all()
    assert not _images(s["train"]) & _images(s["val"])
    # train + val NORMAL = every official-train NORMAL image
    official_normal = manifest[(manifest.official_split == "train") & (manifest["class"] == "NORMAL")]
    val_normal = s["val"][s["val"]["class"] == "NORMAL"]
    expected = {os.path.normpath(str(tmp_path / "raw" / p)) for p in official_normal["path"]}
    assert _images(s["train"]) | _images(val_normal) == expected
    # test = every official test image, 3 per patient x 4 patients x 4 classes
    assert len(s["test"]) == 4 * TEST_PATIENTS * TEST_IMAGES
    assert s["test"]["class"].value_counts().to_dict() == {c: 12 for c in CLASSES}
    assert not _images(s["test"]) & (_images(s["train"]) | _images(s["val"]))
    # labels 0 NORMAL / 1 disease
    for df in s.values():
        assert ((df["class"] != "NORMAL").astype(int) == df["label"]).all()
    # outside the cwd -> absolute paths; masks resolved, empty for NORMAL
    assert all(os.path.isabs(p) for p in s["val"]["path"])
    v = s["val"]
    assert (v.loc[v["class"] == "NORMAL", "mask"] == "").all()
    disease_masks = v.loc[v["class"] != "NORMAL", "mask"]
    assert all(m.startswith(str(tmp_path / "raw" / "masks")) for m in disease_masks)


def test_paths_relative_to_cwd_when_inside(manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = SplitParams(protocol="paper", val_normal=10, val_per_disease=8)
    s = make_splits(manifest, tmp_path / "data" / "raw", p, seed=0)
    path = s["test"]["path"].iloc[0]
    assert path.startswith(os.path.join("data", "raw", "test")) and not os.path.isabs(path)
    m = s["test"].loc[s["test"]["class"] == "CNV", "mask"].iloc[0]
    assert m.startswith(os.path.join("data", "raw", "masks"))


def test_paper_too_few_images_names_param(manifest, tmp_path):
    with pytest.raises(ParamError, match="val_per_disease"):
        make_splits(manifest, tmp_path, SplitParams(protocol="paper", val_normal=10,
                                                    val_per_disease=61), seed=0)
    with pytest.raises(ParamError, match="val_normal"):  # all 60 NORMAL would leave no train
        make_splits(manifest, tmp_path, SplitParams(protocol="paper", val_normal=60,
                                                    val_per_disease=5), seed=0)


def _patients(df: pd.DataFrame) -> set[str]:
    return set(df["patient"])


def test_patient_protocol_no_shared_patients_and_dropped(manifest, tmp_path):
    p = SplitParams(protocol="patient", val_normal=10, val_per_disease=10)
    s = make_splits(manifest, tmp_path, p, seed=3)
    tr, va, te = (_patients(s[k]) for k in ("train", "val", "test"))
    assert not tr & va and not tr & te and not va & te
    # test = all official test images
    assert len(s["test"]) == 4 * TEST_PATIENTS * TEST_IMAGES
    # dropped: the train images of the SHARED test patients of each class (5 each),
    # plus patient 1000's 2 DRUSEN train images (1000 is a NORMAL test patient)
    expected_dropped = 4 * SHARED * TRAIN_IMAGES + 2
    assert s["train"].attrs["dropped_overlap"] == expected_dropped
    assert s["train"].attrs["dropped_overlap_patients"] == 4 * SHARED
    assert set(s["train"]["class"]) == {"NORMAL"}
    # val: whole patients, about the requested counts (within one patient's images)
    counts = s["val"]["class"].value_counts().to_dict()
    assert abs(counts["NORMAL"] - 10) <= TRAIN_IMAGES // 2
    for cls in ("CNV", "DME", "DRUSEN"):
        assert abs(counts[cls] - 10) <= TRAIN_IMAGES // 2
    # every remaining official-train NORMAL image of a non-val, non-test patient is in train
    official = manifest[manifest.official_split == "train"]
    remaining = official[~official.patient.isin(te | va) & (official["class"] == "NORMAL")]
    assert len(s["train"]) == len(remaining) == (TRAIN_PATIENTS - SHARED) * TRAIN_IMAGES - counts["NORMAL"]
    # a val patient brings all of their official-train images
    for pid in va:
        assert (s["val"].patient == pid).sum() == (official.patient == pid).sum()


def test_patient_protocol_test_per_class(manifest, tmp_path):
    p = SplitParams(protocol="patient", val_normal=10, val_per_disease=10, test_per_class=6)
    s = make_splits(manifest, tmp_path, p, seed=0)
    counts = s["test"]["class"].value_counts().to_dict()
    assert counts == {c: 6 for c in CLASSES}  # 2 whole patients of 3 images each
    test_pids = _patients(s["test"])
    official_test = manifest[manifest.official_split == "test"]
    for pid in test_pids:  # whole patients
        assert (s["test"].patient == pid).sum() == (official_test.patient == pid).sum()
    # only the train images of the kept test patients are dropped
    official_train = manifest[manifest.official_split == "train"]
    assert s["train"].attrs["dropped_overlap"] == official_train.patient.isin(test_pids).sum()
    assert not _patients(s["train"]) & test_pids and not _patients(s["val"]) & test_pids


def test_patient_protocol_too_few_names_param(manifest, tmp_path):
    # 10 CNV train patients x 5 images remain after dropping test patients
    with pytest.raises(ParamError, match="data.split.val_per_disease"):
        make_splits(manifest, tmp_path, SplitParams(val_normal=5, val_per_disease=51), seed=0)


@pytest.mark.parametrize("protocol", ["paper", "patient"])
def test_seed_reproducible(manifest, tmp_path, protocol):
    p = SplitParams(protocol=protocol, val_normal=10, val_per_disease=10)
    a = make_splits(manifest, tmp_path, p, seed=1)
    b = make_splits(manifest.sample(frac=1.0, random_state=7), tmp_path, p, seed=1)  # row order
    c = make_splits(manifest, tmp_path, p, seed=2)
    for k in ("train", "val", "test"):
        pd.testing.assert_frame_equal(a[k], b[k])
    assert _images(a["val"]) != _images(c["val"])
    assert _images(a["train"]) != _images(c["train"])


def test_write_splits(manifest, tmp_path):
    p = SplitParams(protocol="patient", val_normal=10, val_per_disease=10)
    s = make_splits(manifest, tmp_path / "raw", p, seed=0)
    summary = write_splits(s, tmp_path / "splits")
    for k in ("train", "val", "test"):
        back = pd.read_csv(tmp_path / "splits" / f"{k}.csv", dtype={"patient": str},
                           keep_default_na=False)
        assert list(back.columns) == COLUMNS
        assert back["path"].tolist() == s[k]["path"].tolist()
        assert back["patient"].tolist() == s[k]["patient"].tolist()
    on_disk = json.loads((tmp_path / "splits" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["protocol"] == "patient" and summary["seed"] == 0
    assert summary["counts"]["test"] == {"NORMAL": 12, "CNV": 12, "DME": 12, "DRUSEN": 12,
                                         "total": 48}
    assert summary["counts"]["train"]["total"] == len(s["train"])
    assert summary["counts"]["train"]["CNV"] == 0
    assert summary["patients"]["test"] == 4 * TEST_PATIENTS
    assert summary["dropped_for_patient_overlap"] == {"images": 4 * SHARED * TRAIN_IMAGES + 2,
                                                      "patients": 4 * SHARED}
    assert summary["shared_patients"] == {"train-val": 0, "train-test": 0, "val-test": 0}


def test_manifest_csv_roundtrip_and_numeric_patient_ids(manifest, tmp_path):
    from sparsegan.data.split import read_manifest
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    back = read_manifest(tmp_path / "manifest.csv")
    assert back["patient"].iloc[0] == "1000" and back["mask"].iloc[0] == ""
    p = SplitParams(protocol="patient", val_normal=10, val_per_disease=10)
    a = make_splits(back, tmp_path, p, seed=0)
    # ids read as numbers with blanks (float64) give the same patients, without ".0"
    numeric = manifest.assign(patient=manifest["patient"].astype(float))
    numeric.loc[0, "patient"] = float("nan")  # one image without a patient id
    b = make_splits(numeric, tmp_path, p, seed=0)
    assert not any(pid.endswith(".0") for df in b.values() for pid in df["patient"])
    # the image without an id is a patient of its own: no longer dropped with test patient 1000
    assert b["train"].attrs["dropped_overlap"] == a["train"].attrs["dropped_overlap"] - 1
    orphan = os.path.normpath(str(tmp_path / manifest["path"].iloc[0]))
    kept = pd.concat([b["train"], b["val"]])
    assert kept.loc[kept["path"] == orphan, "patient"].tolist() == [""]
    tr, va, te = (set(b[k]["path"]) for k in ("train", "val", "test"))
    assert not tr & va and not tr & te and not va & te


@pytest.mark.parametrize("protocol", ["paper", "patient"])
def test_val_per_disease_mapping_per_class(manifest, tmp_path, protocol):
    p = SplitParams(protocol=protocol, val_normal=10, val_per_disease={"CNV": 15, "DME": 5})
    s = make_splits(manifest, tmp_path, p, seed=0)
    val = s["val"]["class"].value_counts().to_dict()
    assert val.get("DRUSEN", 0) == 0  # not named in the mapping: none in validation
    if protocol == "paper":  # exact by image
        assert (val["CNV"], val["DME"], val["NORMAL"]) == (15, 5, 10)
    else:  # whole patients of 5 images: as near as patients allow
        assert (val["CNV"], val["DME"], val["NORMAL"]) == (15, 5, 10)
    assert set(s["train"]["class"]) == {"NORMAL"}


@pytest.mark.parametrize("protocol", ["paper", "patient"])
def test_missing_class_is_fine_with_a_number(manifest, tmp_path, protocol):
    no_dme = manifest[manifest["class"] != "DME"]
    s = make_splits(no_dme, tmp_path, SplitParams(protocol=protocol, val_normal=10,
                                                  val_per_disease=5), seed=0)
    val = s["val"]["class"].value_counts().to_dict()
    assert "DME" not in val and val["CNV"] == 5 and val["DRUSEN"] >= 5
    assert not (s["test"]["class"] == "DME").any()


@pytest.mark.parametrize("protocol", ["paper", "patient"])
def test_too_few_files_names_the_class_its_count_and_the_param(manifest, tmp_path, protocol):
    no_dme = manifest[manifest["class"] != "DME"]
    with pytest.raises(ParamError) as exc:  # asked for by name, but absent
        make_splits(no_dme, tmp_path, SplitParams(protocol=protocol, val_normal=10,
                                                  val_per_disease={"DME": 3}), seed=0)
    assert "data.split.val_per_disease.DME = 3" in str(exc.value)
    assert "only 0 DME images" in str(exc.value)
    have = 60 if protocol == "paper" else 50  # patient: 2 test patients' images dropped
    with pytest.raises(ParamError) as exc:
        make_splits(manifest, tmp_path, SplitParams(protocol=protocol, val_normal=10,
                                                    val_per_disease={"CNV": 61}), seed=0)
    assert f"data.split.val_per_disease.CNV = 61" in str(exc.value)
    assert f"only {have} CNV images" in str(exc.value)


def test_unknown_patients_are_counted_in_the_summary(manifest, tmp_path):
    m = manifest.copy()
    anonymous = m["official_split"].eq("train") & m["class"].eq("NORMAL")
    m.loc[anonymous, "patient"] = ""  # 60 NORMAL train files without a patient
    s = make_splits(m, tmp_path, SplitParams(val_normal=12, val_per_disease=5), seed=0)
    summary = write_splits(s, tmp_path / "splits")
    unknown = summary["unknown_patient_files"]
    assert unknown == {"train": 48, "val": 12, "test": 0}  # 12 single-file groups in val
    assert "by file only" in summary["unknown_patient_note"]
    assert json.loads((tmp_path / "splits" / "summary.json").read_text())["unknown_patient_files"] == unknown
    clean = write_splits(make_splits(manifest, tmp_path, SplitParams(val_normal=12,
                                                                     val_per_disease=5), seed=0),
                         tmp_path / "clean")
    assert clean["unknown_patient_files"] == {"train": 0, "val": 0, "test": 0}
    assert "unknown_patient_note" not in clean
