"""data.source=folder: locating OCT2017 layouts and indexing a user's copy in place."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from sparsegan.data.oct2017 import (Oct2017NotFoundError, build_manifest, find_oct2017_root,
                                    folder_manifest)

TRAIN = {"NORMAL": 3, "CNV": 2, "DME": 2, "DRUSEN": 1}
TEST = {"NORMAL": 2, "CNV": 2, "DME": 1, "DRUSEN": 1}
VAL = {"NORMAL": 1, "CNV": 1, "DME": 1, "DRUSEN": 1}


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("L", (16, 12), color=(seed * 37) % 256).save(buf, "JPEG")
    path.write_bytes(buf.getvalue())


def make_tree(root: Path, splits: dict[str, dict[str, int]], patient0: int = 100) -> int:
    k = 0
    for split, counts in splits.items():
        for cls, n in counts.items():
            for i in range(n):
                k += 1
                _jpeg(root / split / cls / f"{cls}-{patient0 + i}-{k}.jpeg", k)
    return k


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def test_kaggle_layout_trailing_space_val_merged_in_place(tmp_path):
    user = tmp_path / "downloads" / "kermany2018"
    oct_root = user / "OCT2017 "  # Kaggle's folder name ends with a space
    make_tree(oct_root, {"train": TRAIN, "test": TEST, "val": VAL})
    (oct_root / "train" / ".DS_Store").write_bytes(b"\x00\x01")
    (oct_root / "train" / "CNV" / ".DS_Store").write_bytes(b"\x00\x02")
    before = snapshot(user)
    manifest_dir = tmp_path / "repo" / "data" / "raw"
    manifest_dir.mkdir(parents=True)

    df = folder_manifest(str(user), manifest_dir)

    assert list(df.columns) == ["path", "class", "patient", "official_split", "mask"]
    counts = df.groupby(["official_split", "class"]).size().to_dict()
    assert counts == {**{("train", c): n for c, n in TRAIN.items()},
                      **{("test", c): TEST[c] + VAL[c] for c in TEST}}
    assert set(df["official_split"]) == {"train", "test"}
    assert len(df) == sum(TRAIN.values()) + sum(TEST.values()) + sum(VAL.values())
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert df["path"].str.contains("/OCT2017 /").all()
    assert df["path"].str.contains("/val/").sum() == sum(VAL.values())
    assert (df.loc[df["path"].str.contains("/val/"), "official_split"] == "test").all()
    assert (df["mask"] == "").all()
    row = df[df["path"].str.endswith("/train/NORMAL/NORMAL-101-2.jpeg")].iloc[0]
    assert (row["class"], row["patient"]) == ("NORMAL", "101")
    assert df.attrs["skipped"] == []
    assert snapshot(user) == before  # nothing copied, moved, created or modified
    assert list(manifest_dir.iterdir()) == []

    train, tests = find_oct2017_root(user)
    assert train == oct_root / "train"
    assert tests == [oct_root / "test", oct_root / "val"]


def test_v3_celldata_layout_is_found(tmp_path):
    z = tmp_path / "ZhangLabData"
    make_tree(z / "CellData" / "OCT", {"train": TRAIN, "test": TEST})
    # the chest X-rays of the same bundle also have train/test/NORMAL: must not be picked
    _jpeg(z / "CellData" / "chest_xray" / "train" / "NORMAL" / "IM-0001-0001.jpeg", 1)
    _jpeg(z / "CellData" / "chest_xray" / "test" / "PNEUMONIA" / "person1_virus_6.jpeg", 2)
    expect = (z / "CellData" / "OCT" / "train", [z / "CellData" / "OCT" / "test"])
    for start in (tmp_path, z, z / "CellData", z / "CellData" / "OCT"):
        assert find_oct2017_root(start) == expect
    df = folder_manifest(str(z / "CellData"), tmp_path / "elsewhere")
    assert df.groupby("official_split").size().to_dict() == {"test": 6, "train": 8}


def test_v2_layout_and_deeper_search(tmp_path):
    make_tree(tmp_path / "OCT2017", {"train": TRAIN, "test": TEST})
    assert find_oct2017_root(tmp_path) == (tmp_path / "OCT2017" / "train",
                                           [tmp_path / "OCT2017" / "test"])
    deep = tmp_path / "a" / "b" / "copy"
    make_tree(deep, {"train": TRAIN, "test": TEST})
    assert find_oct2017_root(tmp_path / "a") == (deep / "train", [deep / "test"])


def test_misnamed_files_are_skipped_and_reported(tmp_path, caplog):
    root = tmp_path / "OCT2017"
    make_tree(root, {"train": TRAIN, "test": TEST})
    _jpeg(root / "train" / "NORMAL" / "DME-555-1.jpeg", 1)  # name says DME, folder NORMAL
    _jpeg(root / "train" / "CNV" / "scan_0001.jpeg", 2)  # any name is taken: patient unknown
    (root / "train" / "CNV" / "notes.txt").write_text("not an image")
    _jpeg(root / "train" / "PNEUMONIA" / "PNEUMONIA-1-1.jpeg", 3)  # unknown class folder
    _jpeg(root / "test" / "loose-1-1.jpeg", 4)  # outside a class folder
    (root / "test" / "DME" / "._DME-1-1.jpeg").write_bytes(b"appledouble")  # hidden: ignored
    with caplog.at_level(logging.WARNING):
        df = folder_manifest(str(tmp_path), tmp_path / "m")
    assert len(df) == sum(TRAIN.values()) + sum(TEST.values()) + 1
    assert not df["path"].str.contains("DME-555|notes|PNEUMONIA|loose|\\._").any()
    row = df[df["path"].str.endswith("scan_0001.jpeg")].iloc[0]
    assert (row["class"], row["patient"]) == ("CNV", "")
    assert df.attrs["patient_from"] == {"file name": len(df) - 1, "patients.csv": 0, "unknown": 1}
    skipped = {Path(p).name: why for p, why in df.attrs["skipped"]}
    assert set(skipped) == {"DME-555-1.jpeg", "notes.txt", "PNEUMONIA", "loose-1-1.jpeg"}
    assert skipped["DME-555-1.jpeg"] == "name says DME but the folder says NORMAL"
    assert skipped["notes.txt"].startswith("not an image file (.bmp .jpeg .jpg .png")
    assert "unknown class folder" in skipped["PNEUMONIA"]
    assert "skipped 4 entries" in caplog.text and "DME-555-1.jpeg" in caplog.text


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (20, 10), color=value).save(path, "PNG")


def _any_names_tree(root: Path) -> None:
    """Renamed files (no OCT2017 names) in lower/upper/mixed-case class folders, no DME at all."""
    for i in range(6):
        _jpeg(root / "train" / "normal" / f"normal_train_{i}.jpg", i)
    _jpeg(root / "train" / "normal" / "NORMAL-777-1.jpeg", 40)  # an OCT2017 name among them
    for i in range(3):
        _png(root / "train" / "Cnv" / f"cnv_{i}.png", 10 + i)
    _jpeg(root / "train" / "DRUSEN" / "d0.jpeg", 20)
    _jpeg(root / "test" / "NORMAL" / "t_normal.JPG", 30)
    _png(root / "test" / "cnv" / "t_cnv.PNG", 31)


def test_arbitrary_names_any_case_missing_class_without_patients_csv(tmp_path):
    root = tmp_path / "mydata"
    _any_names_tree(root)
    before = snapshot(root)
    df = folder_manifest(str(root), tmp_path / "raw")
    counts = df.groupby(["official_split", "class"]).size().to_dict()
    assert counts == {("train", "NORMAL"): 7, ("train", "CNV"): 3, ("train", "DRUSEN"): 1,
                      ("test", "NORMAL"): 1, ("test", "CNV"): 1}  # no DME anywhere: fine
    assert df.loc[df["path"].str.endswith("NORMAL-777-1.jpeg"), "patient"].tolist() == ["777"]
    assert (df.loc[~df["path"].str.endswith("NORMAL-777-1.jpeg"), "patient"] == "").all()
    assert df.attrs["patient_from"] == {"file name": 1, "patients.csv": 0, "unknown": 12}
    assert df["path"].str.contains("/train/Cnv/cnv_0.png").any()  # the folder as it is on disk
    assert snapshot(root) == before


def test_patients_csv_in_the_tree_and_named_by_param(tmp_path):
    root = tmp_path / "mydata"
    _any_names_tree(root)
    # in the tree's root: paths relative to it, or bare names when unique
    (root / "patients.csv").write_text("file,patient\n"
                                       "train/normal/normal_train_0.jpg,P1\n"
                                       "normal_train_1.jpg,P1\n"
                                       "cnv_2.png,P9\n"
                                       "NORMAL-777-1.jpeg,ignored\n")
    df = folder_manifest(str(root), tmp_path / "raw")
    patient = dict(zip(df["path"].map(lambda p: Path(p).name), df["patient"]))
    assert patient["normal_train_0.jpg"] == patient["normal_train_1.jpg"] == "P1"
    assert patient["cnv_2.png"] == "P9"
    assert patient["NORMAL-777-1.jpeg"] == "777"  # an OCT2017 name comes first
    assert patient["normal_train_2.jpg"] == ""
    assert df.attrs["patient_from"] == {"file name": 1, "patients.csv": 3, "unknown": 9}
    assert not df["path"].str.endswith("patients.csv").any()

    # named by data.patients, anywhere (outside the tree): keys relative to the tree's root
    elsewhere = tmp_path / "meta" / "groups.csv"
    elsewhere.parent.mkdir()
    elsewhere.write_text("file,patient\ntest/cnv/t_cnv.PNG,Q\nt_normal.JPG,Q\n")
    df = folder_manifest(str(root), tmp_path / "raw", patients=str(elsewhere))
    patient = dict(zip(df["path"].map(lambda p: Path(p).name), df["patient"]))
    assert patient["t_cnv.PNG"] == patient["t_normal.JPG"] == "Q"
    assert patient["normal_train_0.jpg"] == ""  # the tree's own patients.csv is not read then

    with pytest.raises(Oct2017NotFoundError, match="data.patients = .*nope.csv.*no such file"):
        folder_manifest(str(root), tmp_path / "raw", patients=str(tmp_path / "nope.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("name,id\na,b\n")
    with pytest.raises(Oct2017NotFoundError, match="bad.csv: missing column.*file, patient"):
        folder_manifest(str(root), tmp_path / "raw", patients=str(bad))


def test_patients_csv_bare_name_that_is_not_unique_is_an_error(tmp_path):
    root = tmp_path / "mydata"
    _any_names_tree(root)
    _jpeg(root / "test" / "NORMAL" / "normal_train_0.jpg", 50)  # same name as a train file
    (root / "patients.csv").write_text("file,patient\nnormal_train_0.jpg,P1\n")
    with pytest.raises(Oct2017NotFoundError, match="more than one file has that name"):
        folder_manifest(str(root), tmp_path / "raw")


def test_paths_relative_inside_manifest_dir(tmp_path):
    raw = tmp_path / "raw"
    make_tree(raw / "oct2017" / "OCT2017", {"train": TRAIN, "test": TEST})
    train, tests = find_oct2017_root(raw / "oct2017")
    df = build_manifest(train, tests, raw)
    assert df["path"].str.startswith("oct2017/OCT2017/").all()
    assert all((raw / p).is_file() for p in df["path"])
    assert df.iloc[0]["path"] == "oct2017/OCT2017/train/CNV/CNV-100-4.jpeg"  # sorted walk


def test_missing_folder_and_no_tree_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(Oct2017NotFoundError, match="does not exist") as exc:
        folder_manifest(str(missing), tmp_path)
    assert str(missing) in str(exc.value)
    with pytest.raises(Oct2017NotFoundError, match="empty"):
        folder_manifest("", tmp_path)
    empty = tmp_path / "empty"
    (empty / "something").mkdir(parents=True)
    with pytest.raises(Oct2017NotFoundError) as exc:
        folder_manifest(str(empty), tmp_path)
    msg = str(exc.value)
    assert str(empty) in msg and "'OCT2017 '" in msg and "CellData/OCT" in msg
    assert "'something'" in msg


def test_real_study_groups_runs_of_20_renamed_files(tmp_path):
    from sparsegan.studies import table as study
    root = tmp_path / "tree"
    for n in (1, 19, 20, 39, 40):
        _jpeg(root / "train" / "NORMAL" / f"normal_train_{n}.jpg", n)
    _jpeg(root / "test" / "CNV" / "cnv_train_5.jpg", 5)
    _jpeg(root / "train" / "NORMAL" / "NORMAL-123-1.jpeg", 6)  # OCT2017 name: not listed
    _png(root / "train" / "NORMAL" / "NORMAL-6.png", 7)  # neither: stays unknown
    counts = study.write_groups(root, tmp_path / "patients.csv")
    assert counts == {"grouped": 6, "left": 2}
    df = folder_manifest(str(root), tmp_path / "raw", patients=str(tmp_path / "patients.csv"))
    patient = dict(zip(df["path"].map(lambda p: Path(p).name), df["patient"]))
    assert patient["normal_train_1.jpg"] == patient["normal_train_19.jpg"] == "normal_train:0"
    assert patient["normal_train_20.jpg"] == patient["normal_train_39.jpg"] == "normal_train:1"
    assert patient["normal_train_40.jpg"] == "normal_train:2"
    assert patient["cnv_train_5.jpg"] == "cnv_train:0"  # another numbering: another group
    assert patient["NORMAL-123-1.jpeg"] == "123" and patient["NORMAL-6.png"] == ""


def _patients_apart(root: Path, splits: dict[str, dict[str, int]]) -> None:
    """:func:`make_tree` with a patient of its own for every file."""
    for n, (split, counts) in enumerate(splits.items()):
        for m, (cls, count) in enumerate(counts.items()):
            make_tree(root, {split: {cls: count}}, patient0=1000 * (1 + 4 * n + m))


def _real_split(tree: Path, tmp_path: Path):
    """The split the real-data study makes of ``tree``: its overrides (the rule of
    sparsegan.studies.real) applied to the folder source and the split."""
    from sparsegan.data.split import make_splits
    from sparsegan.params import parse_params
    from sparsegan.studies.real import real_overrides

    over = real_overrides(tree, None)
    split = {"val_normal": int(over["data.split.val_normal"]),
             "val_per_disease": over["data.split.val_per_disease"]}
    p = parse_params({"data": {"source": "folder", "folder": over["data.folder"],
                               "split": split}})
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    df = folder_manifest(over["data.folder"], raw)
    return over, make_splits(df, raw, p.data.split, p.data.split.seed)


def test_the_real_split_is_a_rule_every_disease_scan_to_validation(tmp_path):
    """Class counts unlike the development subset's: all disease scans of train/ validate, a
    fifth of the training normals (below 1,500 of them), training keeps only normals."""
    tree = tmp_path / "tree"
    _patients_apart(tree, {"train": {"NORMAL": 20, "CNV": 5, "DRUSEN": 3},
                           "test": {"NORMAL": 4, "CNV": 4}})
    over, splits = _real_split(tree, tmp_path)
    assert over["data.split.val_normal"] == "4" and over["data.split.val_per_disease"] == "all"
    val = splits["val"]["class"].value_counts().to_dict()
    assert val == {"NORMAL": 4, "CNV": 5, "DRUSEN": 3}
    assert set(splits["train"]["class"]) == {"NORMAL"} and len(splits["train"]) == 16
    assert len(splits["test"]) == 8


def test_the_real_split_survives_the_patient_rule_removing_scans(tmp_path):
    """A DRUSEN patient of train/ also in test/ is dropped from train/ (no patient in two
    splits): a count of the tree would ask for one DRUSEN scan too many; ``all`` takes what is
    left."""
    tree = tmp_path / "tree"
    _patients_apart(tree, {"train": {"NORMAL": 20, "CNV": 4}, "test": {"NORMAL": 3, "CNV": 3}})
    _jpeg(tree / "train" / "DRUSEN" / "DRUSEN-900-1.jpeg", 1)
    _jpeg(tree / "train" / "DRUSEN" / "DRUSEN-901-1.jpeg", 2)
    _jpeg(tree / "test" / "CNV" / "CNV-901-2.jpeg", 3)  # patient 901 is in test too
    _, splits = _real_split(tree, tmp_path)
    val = splits["val"]
    assert (val["class"] == "DRUSEN").sum() == 1 and "901" not in set(val["patient"])
    assert splits["train"].attrs["dropped_overlap"] == 1


@pytest.mark.parametrize("tree,needle", [
    ({"train": {"NORMAL": 20}, "test": {"NORMAL": 3, "CNV": 3}}, "no CNV, DME or DRUSEN"),
    ({"train": {"NORMAL": 5, "CNV": 2}, "test": {"NORMAL": 3, "CNV": 3}}, "needs at least 10"),
    ({"train": {"NORMAL": 20, "CNV": 2}, "test": {"CNV": 3}}, "needs NORMAL images and"),
])
def test_the_study_command_on_a_tree_it_cannot_split_says_so_in_one_line(tmp_path, tree,
                                                                        needle):
    import subprocess
    import sys

    make_tree(tmp_path / "tree", tree)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "study.py"), "run", "--folder",
                           str(tmp_path / "tree"), "--study", "x"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, lines
