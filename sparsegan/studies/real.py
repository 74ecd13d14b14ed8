"""The real-data split of the studies: the ``dvc exp run -S`` overrides that put a real OCT tree
(``data.source=folder``: ``<tree>/{train,test}/<CLASS>/<images>``) through the pipeline.

The split is a rule, not one tree's counts: every disease scan of the tree's ``train/`` goes to
validation (training sees normals only anyway; ``data.split.val_per_disease=all``), with
:data:`VAL_NORMAL` NORMAL scans, or a fifth of the training normals when the tree has fewer than
five times that; ``test/`` is the test set. On ``../shared/oct_real`` that is 300 NORMAL and
305 / 36 / 28 CNV / DME / DRUSEN validation scans.
"""

from __future__ import annotations

from pathlib import Path

from ..data import IMAGE_EXTENSIONS

VAL_NORMAL = 300


def _count(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)


def check_tree(folder: Path) -> dict[str, dict[str, int]]:
    """Image counts ``{split: {class: n}}`` of a real tree; SystemExit with one line naming the
    folder and what is missing when the rule cannot split it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: --folder {folder}: not a folder")
    counts = {split: {c.name.upper(): _count(c) for c in sorted((folder / split).glob("*"))
                      if c.is_dir()} for split in ("train", "test")}
    normal = counts["train"].get("NORMAL", 0)
    if normal < 10:
        raise SystemExit(f"error: {folder}/train/NORMAL: {normal} images; the study trains on "
                         f"normal scans and needs at least 10 there (a fifth go to validation)")
    if not any(n for c, n in counts["train"].items() if c != "NORMAL"):
        raise SystemExit(f"error: {folder}/train: no CNV, DME or DRUSEN images; validation "
                         f"(phi, every choice) needs diseased scans there")
    test = counts["test"]
    if not test.get("NORMAL") or not any(n for c, n in test.items() if c != "NORMAL"):
        raise SystemExit(f"error: {folder}/test: needs NORMAL images and diseased ones "
                         f"(found {test or 'none'})")
    return counts


def val_normal(n_train_normal: int) -> int:
    """NORMAL validation scans for a tree with ``n_train_normal`` training normals."""
    return min(VAL_NORMAL, n_train_normal // 5)


def real_overrides(folder: Path, patients: Path | None) -> dict[str, str]:
    """``-S`` overrides (key -> value text) that run the pipeline on ``folder`` by the rule."""
    counts = check_tree(folder)
    out = {"data.source": "folder",
           "data.split.val_normal": str(val_normal(counts["train"]["NORMAL"])),
           "data.split.val_per_disease": "all",
           "data.folder": str(Path(folder).resolve())}
    if patients is not None:
        out["data.patients"] = str(Path(patients).resolve())
    return out


# The real-data recipe: the best setting on real validation scans, applied by the study command
# on a real tree (scripts/study.py run --folder; --recipe "" runs the params.yaml defaults).
RECIPE = Path("studies/real/recipe.yaml")


def recipe_overrides(path: Path) -> dict[str, str]:
    """The ``-S`` overrides (dotted key -> value text) of a recipe file, a YAML mapping of dotted
    params keys, each checked as params.yaml would be; SystemExit with one line naming the file
    and the key when it is missing, not a mapping, or holds a bad param."""
    import yaml

    from ..params import ParamError, parse_params

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: --recipe {path}: not found (the committed one is {RECIPE})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SystemExit(f"error: {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or not raw:
        raise SystemExit(f"error: {path}: must be a mapping of params keys, e.g. train.epochs: 240")
    nested: dict = {}
    for key, value in raw.items():
        *parents, leaf = str(key).split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SystemExit(f"error: {path}: {key}: {p} is set twice")
        node[leaf] = value
    try:
        parse_params(nested)
    except ParamError as exc:
        raise SystemExit(f"error: {path}: {str(exc).removeprefix('params.yaml: ')}") from None
    return {str(k): yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")
            for k, v in raw.items()}
