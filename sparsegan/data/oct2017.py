"""The real OCT2017 data (Kermany et al., CC BY 4.0, doi:10.17632/rscbjbr9sj): download or use in place.

Two sources end in the manifest of :mod:`sparsegan.data` (columns ``path, class, patient,
official_split, mask``):

``data.source=oct2017``  :func:`fetch_oct2017` downloads the Mendeley archive into
    ``<raw>/downloads/`` (or a separate downloads folder, see its docstring; resumable, verified, see :mod:`sparsegan.data.download`), extracts it
    safely into ``<raw>/oct2017/`` (skipping the chest X-rays and macOS ``._*`` files), finds the
    tree and indexes it. A marker file ``<raw>/oct2017/.extracted.json``, written after a
    successful extraction, makes re-runs with the same URL/checksum skip download and extraction
    (the archive may then be deleted to save space). Paths in the manifest are relative to
    ``<raw>``.
``data.source=folder``   :func:`folder_manifest` indexes the user's existing copy *in place*
    (never copied, moved or modified): manifest paths are absolute. Any tree
    ``<root>/<split>/<CLASS>/<any image file>`` works (class folders in any case, classes may be
    missing); patients come from OCT2017 names, else from a ``patients.csv`` (``data.patients``).

Layouts found by :func:`find_oct2017_root`: Kaggle ``kermany2018`` (folder ``OCT2017 `` with a
trailing space, ``train/ test/ val/``; the 32-image ``val`` is part of the official test set and is
merged into it), Mendeley v2 ``OCT2017/{train,test}``, Mendeley v3 ``CellData/OCT/{train,test}``
(or ``ZhangLabData/CellData/OCT``), or any folder that directly holds ``train/`` and ``test/``.

Default download URLs (public Mendeley Data file links of dataset rscbjbr9sj, the
``.../public-files/datasets/rscbjbr9sj/files/<file id>/file_downloaded`` form that many public
download scripts use):

- v3 ``ZhangLabData.zip`` (about 8.4 GB; OCT + chest X-rays), file id 810b2ce2-...;
- v2 ``OCT2017.tar.gz`` (5,793,183,169 bytes), file id 5699a1d8-....

No publisher checksum is published for either file, so the defaults carry no SHA-256: the size
check (server ``Content-Length``, and for v2 the known size) and the archives' own CRCs (zip
members, gzip stream) still catch truncated or corrupted downloads. Set ``data.oct2017.sha256`` to
pin the file you downloaded. (A third-party script gives
``acbc42869440eec719361942d0ba560f132742230262f22e78bfb93eb5ea4563`` for v3's ``ZhangLabData.zip``;
it is unverified, so it is not a default: a wrong default would delete a finished 8 GB download.)
``data.oct2017.url`` replaces the default URL; the default size then no longer applies.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import pandas as pd

from sparsegan.data import IMAGE_EXTENSIONS
from sparsegan.data.download import download, safe_extract
from sparsegan.params import CLASSES, Oct2017Params

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "class", "patient", "official_split", "mask")


class OctSource(NamedTuple):
    url: str
    sha256: str  # "" = unknown (the size check still applies)
    size: int | None  # bytes; None = unknown (the server's Content-Length is checked)
    root: str  # where train/ and test/ lie inside the extracted archive


_MENDELEY = "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/{}/file_downloaded"
DEFAULT_SOURCES: dict[str, OctSource] = {
    "v3": OctSource(_MENDELEY.format("810b2ce2-11c3-4424-996e-3bef36600907"), "", None,
                    "CellData/OCT"),
    "v2": OctSource(_MENDELEY.format("5699a1d8-d1b6-45db-bb92-b61051445347"), "", 5_793_183_169,
                    "OCT2017"),
}
ARCHIVE_NAMES = {"v3": "ZhangLabData.zip", "v2": "OCT2017.tar.gz"}
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")

# Members never extracted: the chest X-rays bundled with v3, macOS resource forks.
_SKIP_DIRS = {"chest_xray", "__MACOSX"}
MARKER = ".extracted.json"

# An OCT2017 file name: <CLASS>-<patientID>-<imageNo>.<ext>; its patient is trusted when the
# class matches the folder. Any other name is taken too, its patient from patients.csv.
_NAME = re.compile(r"^(?P<cls>[A-Za-z]+)-(?P<patient>[0-9A-Za-z]+)-(?P<no>\d+)\.[A-Za-z]+$")


def patient_from_name(name: str) -> str | None:
    """The patient of an OCT2017 file name ``<CLASS>-<patient>-<n>.<ext>``, else None."""
    m = _NAME.match(name)
    return m["patient"] if m else None
PATIENTS_CSV = "patients.csv"
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}
_MAX_DEPTH = 4


class Oct2017NotFoundError(FileNotFoundError):
    """No OCT2017 tree (train/ and test/ with class folders) under the given folder."""


# ------------------------------------------------------------------------------------ locating


def _is_root(folder: Path) -> bool:
    """``folder`` holds train/ and test/, and train/ holds at least one class folder (any case;
    a tree whose train/ has NORMAL only is fine: diseases may appear in test/ alone)."""
    train, test = folder / "train", folder / "test"
    if not (train.is_dir() and test.is_dir()):
        return False
    try:
        names = {e.name.upper() for e in os.scandir(train) if e.is_dir()}
    except OSError:
        return False
    return bool(names & set(CLASSES))


def _split_dirs(root: Path) -> tuple[Path, list[Path]]:
    tests = [root / "test"]
    if (root / "val").is_dir():
        tests.append(root / "val")  # Kaggle's val is part of the official test set
    return root / "train", tests


_CANDIDATES = (".", "OCT2017 ", "OCT2017", "CellData/OCT", "ZhangLabData/CellData/OCT", "OCT")


def find_oct2017_root(path: Path) -> tuple[Path, list[Path]]:
    """Return ``(train_dir, test_dirs)`` of the OCT2017 tree at or below ``path``.

    Tries ``path`` itself, then ``OCT2017 `` (Kaggle, trailing space), ``OCT2017`` (v2),
    ``CellData/OCT`` and ``ZhangLabData/CellData/OCT`` (v3), then searches up to 4 levels down
    (shallowest first, skipping hidden folders, ``__MACOSX``, ``chest_xray`` and class folders). A
    Kaggle ``val/`` folder is returned after ``test/``.
    """
    path = Path(path)
    if not path.is_dir():
        raise Oct2017NotFoundError(f"{path}: not a folder; expected a copy of OCT2017")
    for cand in _CANDIDATES:
        folder = path / cand if cand != "." else path
        if _is_root(folder):
            return _split_dirs(folder)

    level = [path]
    for _ in range(_MAX_DEPTH):
        nxt: list[Path] = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if not e.is_dir() or e.name.startswith(".") or e.name in _SKIP_DIRS:
                    continue
                if e.name.upper() in CLASSES or e.name in ("train", "test", "val"):
                    continue
                sub = Path(e.path)
                if _is_root(sub):
                    return _split_dirs(sub)
                nxt.append(sub)
        level = nxt
        if not level:
            break

    try:
        seen = sorted(e.name for e in os.scandir(path))
    except OSError:
        seen = []
    listing = ", ".join(repr(n) for n in seen[:12]) + (", ..." if len(seen) > 12 else "")
    raise Oct2017NotFoundError(
        f"{path}: no OCT2017 tree found. Looked for a folder holding train/ and test/ (train/ with "
        f"CNV, DME, DRUSEN or NORMAL folders) at {path} itself, at 'OCT2017 ' (Kaggle kermany2018, "
        f"trailing space), 'OCT2017' (Mendeley v2), 'CellData/OCT' and 'ZhangLabData/CellData/OCT' "
        f"(Mendeley v3), and up to {_MAX_DEPTH} levels below. The folder holds: "
        f"{listing or '(nothing)'}. Point data.folder at your OCT2017 copy.")


# ------------------------------------------------------------------------------------ manifest


def _manifest_path(image: str, manifest_dir: str) -> str:
    """Relative (POSIX) to the manifest's folder when inside it, else absolute."""
    rel = os.path.relpath(image, manifest_dir)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return image
    return PurePosixPath(*Path(rel).parts).as_posix()


def read_patients_csv(path: Path) -> dict[str, str]:
    """``patients.csv`` (columns ``file, patient``) -> {file: patient}.

    ``file`` is a path (``train/NORMAL/scan_1.jpg``, relative to the folder the caller keys the
    table to: see :func:`build_manifest`) or a bare file name (``scan_1.jpg``), which then must be
    unique in the tree. Errors name the file and row.
    """
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise Oct2017NotFoundError(f"{path}: not a readable patients.csv "
                                   f"({' '.join(str(exc).split())[:120]})") from None
    missing = {"file", "patient"} - set(table.columns)
    if missing:
        raise Oct2017NotFoundError(f"{path}: missing column(s) {', '.join(sorted(missing))}; a "
                                   f"patients.csv has the columns file, patient (one row per image)")
    out: dict[str, str] = {}
    for i, (file, patient) in enumerate(zip(table["file"], table["patient"]), start=2):
        key = PurePosixPath(file.strip().replace("\\", "/")).as_posix()
        if not key or key == ".":
            raise Oct2017NotFoundError(f"{path}, line {i}: empty file name")
        if key in out and out[key] != patient.strip():
            raise Oct2017NotFoundError(f"{path}, line {i}: {key!r} is listed twice with different "
                                       f"patients ({out[key]!r}, {patient.strip()!r})")
        out[key] = patient.strip()
    return out


class _PatientLookup:
    """Patients of files from ``patients.csv`` tables, each keyed relative to its own folder."""

    def __init__(self, tables: list[tuple[Path, dict[str, str]]]):
        self.tables = [(Path(os.path.abspath(folder)), t) for folder, t in tables]
        self.by_name: dict[str, list[str]] = {}  # bare file name -> its patients, one per table
        for _, table in self.tables:
            for key, patient in table.items():
                if "/" not in key:
                    self.by_name.setdefault(key, []).append(patient)

    def __call__(self, image: Path, same_name: int) -> str:
        """The patient of ``image`` ("" if not listed); ``same_name``: files in the tree with
        its name (a bare-name entry must be unambiguous)."""
        for folder, table in self.tables:
            rel = os.path.relpath(image, folder)
            if not rel.startswith(os.pardir):
                key = PurePosixPath(*Path(rel).parts).as_posix()
                if key in table:
                    return table[key]
        hits = self.by_name.get(image.name, [])
        if hits and (len(hits) > 1 or same_name > 1):
            raise Oct2017NotFoundError(
                f"patients.csv names {image.name!r} without a folder, and more than one file has "
                f"that name ({image}, ...): write its path instead, relative to the CSV's folder "
                f"(to the tree's root for data.patients), e.g. train/NORMAL/{image.name}")
        return hits[0] if hits else ""


def build_manifest(root_train: Path, test_dirs: list[Path], manifest_dir: Path,
                   patients: Path | None = None) -> pd.DataFrame:
    """Index ``<split>/<CLASS>/<any image file>`` into a manifest DataFrame.

    The class comes from the folder, matched without regard to case; a class may be missing.
    Every file type of :data:`sparsegan.data.IMAGE_EXTENSIONS` is taken, whatever its name. The
    patient is the ``<patientID>`` of an OCT2017 name ``<CLASS>-<patientID>-<imageNo>.<ext>``,
    else the ``patients.csv`` entry (``patients`` if given, its ``file`` column relative to the
    tree's root, the folder holding ``train/``; else ``patients.csv`` files found in the root and
    in the split folders, each relative to its own folder), else empty (unknown: the split then
    treats the file as a patient of its own). The per-file source is in ``df.attrs["patient_from"]`` counts.

    Skipped and reported (``df.attrs["skipped"]``: a list of ``(path, reason)``, also logged as a
    warning): files that are not images, OCT2017 names whose class disagrees with their folder,
    folders that are not one of CNV/DME/DRUSEN/NORMAL, files outside a class folder, nested
    folders. Hidden files, ``Thumbs.db``, ``desktop.ini`` and ``patients.csv`` are ignored
    silently. Paths are absolute when the images lie outside ``manifest_dir``, else relative to
    it. Nothing is written: the images are read in place.
    """
    mdir = os.path.abspath(manifest_dir)
    root_train = Path(root_train)
    tables: list[tuple[Path, dict[str, str]]] = []
    if patients is not None:
        if not Path(patients).is_file():
            raise Oct2017NotFoundError(f"data.patients = {str(patients)!r}: no such file; it "
                                       f"names a CSV with the columns file, patient")
        tables.append((root_train.parent, read_patients_csv(Path(patients))))
    else:
        for folder in [root_train.parent, root_train, *map(Path, test_dirs)]:
            if (folder / PATIENTS_CSV).is_file():
                tables.append((folder, read_patients_csv(folder / PATIENTS_CSV)))
    lookup = _PatientLookup(tables)
    found: list[tuple[Path, str, str, str]] = []  # image, class, split, patient of its name
    skipped: list[tuple[str, str]] = []
    for split, folder in [("train", root_train)] + [("test", Path(d)) for d in test_dirs]:
        if not folder.is_dir():
            raise Oct2017NotFoundError(f"{folder}: {split} folder not found")
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if _ignored(entry.name):
                continue
            if not entry.is_dir():
                skipped.append((entry.path, "not inside a class folder"))
                continue
            cls = entry.name.upper()
            if cls not in CLASSES:
                skipped.append((entry.path, f"unknown class folder {entry.name!r} (allowed: "
                                            f"{', '.join(CLASSES)}, any case); its files are "
                                            f"skipped"))
                continue
            for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
                name = f.name
                if _ignored(name):
                    continue
                if f.is_dir():
                    skipped.append((f.path, "nested folder inside a class folder"))
                    continue
                if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    skipped.append((f.path, f"not an image file ({' '.join(sorted(IMAGE_EXTENSIONS))})"))
                    continue
                m = _NAME.match(name)
                if m and m["cls"].upper() in CLASSES and m["cls"].upper() != cls:
                    skipped.append((f.path, f"name says {m['cls'].upper()} but the folder says "
                                            f"{cls}"))
                    continue
                found.append((Path(os.path.abspath(f.path)), cls, split,
                              m["patient"] if m and m["cls"].upper() == cls else ""))
    names = Counter(image.name for image, *_ in found)
    rows: list[tuple[str, str, str, str, str]] = []
    sources = {"file name": 0, "patients.csv": 0, "unknown": 0}
    for image, cls, split, patient in found:
        how = "file name"
        if not patient:
            patient = lookup(image, names[image.name])
            how = "patients.csv" if patient else "unknown"
        sources[how] += 1
        rows.append((_manifest_path(str(image), mdir), cls, patient, split, ""))
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    df.attrs["skipped"] = skipped
    df.attrs["patient_from"] = sources
    if skipped:
        shown = "; ".join(f"{p}: {why}" for p, why in skipped[:10])
        more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
        log.warning("skipped %d entries of the image tree: %s%s", len(skipped), shown, more)
    if df.empty:
        raise Oct2017NotFoundError(f"{root_train}: no image files "
                                   f"({' '.join(sorted(IMAGE_EXTENSIONS))}) found in the class "
                                   f"folders")
    counts = df.groupby(["official_split", "class"]).size()
    log.info("manifest: %d images; %s; patient from %s", len(df),
             ", ".join(f"{s}/{c} {n}" for (s, c), n in counts.items()),
             ", ".join(f"{k} {v}" for k, v in sources.items()))
    return df


def _ignored(name: str) -> bool:
    """Hidden files (``.DS_Store``, macOS ``._*``), Windows' folder files and patients.csv."""
    return name.startswith(".") or name.lower() in _IGNORED_FILES or name == PATIENTS_CSV


# ------------------------------------------------------------------------------------ sources


def _archive_name(p: Oct2017Params) -> str:
    if p.url:
        base = unquote(PurePosixPath(urlsplit(p.url).path).name)
        if base.lower().endswith(_ARCHIVE_SUFFIXES) and not base.startswith("."):
            return base
    return ARCHIVE_NAMES[p.version]


def _include(rel: PurePosixPath) -> bool:
    return not (set(rel.parts) & _SKIP_DIRS) and not rel.name.startswith("._")


def fetch_oct2017(p: Oct2017Params, work_dir: Path, manifest_dir: Path | None = None) -> pd.DataFrame:
    """Download (resumable), extract safely (once) and index OCT2017; return the manifest.

    Two forms:

    - ``fetch_oct2017(p, raw_dir)``: archive in ``raw_dir/downloads/``, tree in
      ``raw_dir/oct2017/``, manifest paths relative to ``raw_dir``;
    - ``fetch_oct2017(p, downloads_dir, manifest_dir)`` (the acquire stage, which keeps the big
      files outside DVC's outputs): archive in ``downloads_dir/``, tree in
      ``downloads_dir/oct2017/``; manifest paths relative to ``manifest_dir`` when the tree lies
      inside it, else absolute.

    ``p.url``/``p.sha256`` override the version's defaults (see the module docstring).
    """
    work_dir = Path(work_dir)
    if manifest_dir is None:
        manifest_dir, archive_dir = work_dir, work_dir / "downloads"
    else:
        manifest_dir, archive_dir = Path(manifest_dir), work_dir
    src = DEFAULT_SOURCES[p.version]
    url = p.url or src.url
    sha256 = p.sha256 or ("" if p.url else src.sha256)
    size = None if p.url else src.size
    archive = archive_dir / _archive_name(p)
    out = work_dir / "oct2017"
    marker = out / MARKER
    # What the extracted tree came from; a matching marker skips download and extraction (so the
    # archive may be deleted after a successful run to save space).
    stamp = {"archive": archive.name, "url": url, "sha256": sha256}
    done = False
    if marker.is_file():
        try:
            seen = json.loads(marker.read_text())
            done = isinstance(seen, dict) and {k: seen.get(k) for k in stamp} == stamp
        except (OSError, ValueError):
            done = False
    if done:
        log.info("%s already extracted from %s (%s)", out, archive.name, marker)
    else:
        download(url, archive, sha256=sha256, size=size, retries=p.retries)
        tmp = work_dir / "oct2017.partial"
        for stale in (tmp, out):
            if stale.exists():
                shutil.rmtree(stale)
        log.info("extracting %s to %s", archive, out)
        files = safe_extract(archive, tmp, include=_include)
        os.replace(tmp, out)
        marker.write_text(json.dumps({**stamp, "size": archive.stat().st_size,
                                      "files": len(files)}))  # written last: marks success

    inner = out / src.root
    train, tests = find_oct2017_root(inner if not p.url and inner.is_dir() else out)
    return build_manifest(train, tests, manifest_dir)


def folder_manifest(folder: str, manifest_dir: Path, patients: str = "") -> pd.DataFrame:
    """``data.source=folder``: index the user's tree in place (never copied or modified);
    ``patients`` (``data.patients``) names a patients.csv anywhere, "" = look in the tree."""
    if not folder:
        raise Oct2017NotFoundError("data.folder is empty: set it to your OCT2017 copy")
    path = Path(folder).expanduser()
    if not path.exists():
        raise Oct2017NotFoundError(f"data.folder = {folder!r}: {path.absolute()} does not exist; set "
                                   f"data.folder in params.yaml to your OCT2017 copy (the folder "
                                   f"holding train/ and test/, or one above it)")
    if not path.is_dir():
        raise Oct2017NotFoundError(f"data.folder = {folder!r}: {path.absolute()} is not a folder")
    train, tests = find_oct2017_root(path.absolute())
    table = Path(patients).expanduser().absolute() if patients else None
    return build_manifest(train, tests, Path(manifest_dir), table)
