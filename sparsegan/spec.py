"""The trained models of the pipeline, one entry each: everything else is derived from here.

A :class:`ModelSpec` names a model, the module of ``sparsegan/models/`` that builds it (its
``build(name, params, image_size) -> Detector``), the ``params.yaml`` section of its own
hyper-parameters (a dataclass of :mod:`sparsegan.params`, given by its dotted name so that this
file stays free of torch and of params), the params its training reads, the scorer of
:mod:`sparsegan.scoring` that computes its scores, and the rows of the report it feeds by
default. From :data:`MODEL_SPECS` come ``MODELS``, ``MODEL_SCORES``, ``DEFAULT_ROWS``,
``TRAIN_READS`` (the params each ``train_<model>`` stage of ``dvc.yaml`` lists, and all that a
model file stores of its params; those stages and the ``score`` matrix are written by
``python -m sparsegan.spec`` and a test fails when they drift), the detector builder and the
scoring dispatch.

Adding a model: its module in ``sparsegan/models/``, its entry here, its section (dataclass) in
``sparsegan/params.py`` and ``params.yaml``, its rows in ``params.yaml``, then
``python -m sparsegan.spec`` (docs/design.md, "How to add a model").
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The training settings shared by every model: the architecture's width and norm, the batch.
SHARED_READS = ("model.base_channels", "model.norm", "train.batch_size")
# The generator-based models' training schedule (train: in params.yaml), Sec. 2.3.
GENERATOR_READS = ("train.epochs", "train.lr", "train.lr_decay", "train.beta1", "train.lambda_re")


@dataclass(frozen=True)
class ModelSpec:
    """One trained model (see the module doc). ``reads``: the params its training reads besides
    ``runtime`` (keys or whole sections, as ``dvc.yaml`` lists them); ``scores``: the score
    names its scorer gives; ``rows``: row -> score, the report's rows it feeds by default."""

    name: str
    module: str  # sparsegan.models.<module>: build(name, params, image_size)
    section: str  # its own params.yaml section (whole, or a key path like "train")
    params_class: str  # "sparsegan.params:Class" of that section
    reads: tuple[str, ...]
    scorer: str  # a key of sparsegan.scoring.SCORERS
    scores: tuple[str, ...]
    rows: dict[str, str] = field(default_factory=dict)


MODEL_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("autoencoder", "sparse_gan", "train", "sparsegan.params:TrainParams",
              SHARED_READS + GENERATOR_READS, "reconstruction", ("image", "latent"),
              {"autoencoder": "image", "autoencoder_latent": "latent"}),
    ModelSpec("pix2pix", "sparse_gan", "train", "sparsegan.params:TrainParams",
              SHARED_READS + GENERATOR_READS + ("train.lambda_adv",), "reconstruction",
              ("image", "latent"), {"pix2pix_image": "image", "pix2pix_latent": "latent"}),
    ModelSpec("sparse_gan", "sparse_gan", "srn", "sparsegan.params:SrnParams",
              SHARED_READS + GENERATOR_READS + ("train.lambda_adv", "train.lambda_sp", "srn"),
              "reconstruction", ("image", "latent"),
              {"sparse_gan": "latent", "sparse_gan_image": "image"}),
    ModelSpec("anogan", "anogan", "anogan", "sparsegan.params:AnoganParams",
              SHARED_READS + ("anogan",), "anogan", ("search",), {"anogan": "search"}),
    ModelSpec("fanogan", "fanogan", "fanogan", "sparsegan.params:FanoganParams",
              SHARED_READS + ("fanogan",), "fanogan", ("izif",), {"fanogan": "izif"}),
)

# Table 1's rows in the paper's order (the report puts them first; the paper's figures are in
# sparsegan.evaluate.PAPER_TABLE1).
TABLE1_ROWS = ("autoencoder", "anogan", "fanogan", "pix2pix_image", "pix2pix_latent", "sparse_gan")


class SpecError(ValueError):
    """:data:`MODEL_SPECS` is inconsistent (a model or row named twice, a row of no model)."""


def check_specs(specs: tuple[ModelSpec, ...]) -> None:
    """Every model and row named once, every row's score one its model gives, every read a
    ``section`` or ``section.key`` path, Table 1's rows all fed: else SpecError naming it."""
    names, rows = set(), set()
    for s in specs:
        if s.name in names:
            raise SpecError(f"sparsegan/spec.py: model {s.name!r} is specified twice")
        names.add(s.name)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", s.name):
            raise SpecError(f"sparsegan/spec.py: model name {s.name!r}: use lower-case letters, "
                            f"digits and _")
        for row, score in s.rows.items():
            if row in rows:
                raise SpecError(f"sparsegan/spec.py: row {row!r} is fed by two models")
            rows.add(row)
            if score not in s.scores:
                raise SpecError(f"sparsegan/spec.py: {s.name}'s row {row!r} uses score "
                                f"{score!r}, but it gives {', '.join(s.scores)}")
        if not (s.reads and all(re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)*", r) for r in s.reads)):
            raise SpecError(f"sparsegan/spec.py: {s.name}.reads must be params keys or sections")
    missing = [r for r in TABLE1_ROWS if r not in rows]
    if missing:
        raise SpecError(f"sparsegan/spec.py: Table 1's rows {missing} are fed by no model")


check_specs(MODEL_SPECS)
SPECS = {s.name: s for s in MODEL_SPECS}
MODELS = tuple(SPECS)
MODEL_SCORES = {s.name: s.scores for s in MODEL_SPECS}
TRAIN_READS = {s.name: s.reads for s in MODEL_SPECS}
_ALL_ROWS = {row: (s.name, score) for s in MODEL_SPECS for row, score in s.rows.items()}
DEFAULT_ROWS = {row: _ALL_ROWS[row] for row in TABLE1_ROWS} | {
    row: v for row, v in _ALL_ROWS.items() if row not in TABLE1_ROWS}


# ---------------------------------------------------------------------------------------------
# dvc.yaml's training stages, written from the specs


BEGIN = "  # --- written by `python -m sparsegan.spec` from sparsegan/spec.py: do not edit by hand"
END = "  # --- end of the stages written from sparsegan/spec.py"
TRAIN_DEPS = ("stages/train.py", "sparsegan/checkpoint.py", "sparsegan/cli.py",
              "sparsegan/data/__init__.py", "sparsegan/data/dataset.py",
              "sparsegan/distributed.py", "sparsegan/layout.py", "sparsegan/models",
              "sparsegan/params.py", "sparsegan/spec.py", "sparsegan/tracking.py",
              "sparsegan/train.py")
SCORE_DEPS = ("stages/score.py", "sparsegan/anomaly.py", "sparsegan/checkpoint.py",
              "sparsegan/cli.py", "sparsegan/data/__init__.py", "sparsegan/data/dataset.py",
              "sparsegan/layout.py", "sparsegan/metrics.py", "sparsegan/models",
              "sparsegan/params.py", "sparsegan/scoring.py", "sparsegan/spec.py",
              "sparsegan/tracking.py", "models/${item.model}/s${item.seed}", "data/processed")


def spec_stages_yaml(specs: tuple[ModelSpec, ...] = MODEL_SPECS) -> str:
    """The stages of ``dvc.yaml`` that list the models, between :data:`BEGIN` and :data:`END`:
    ``train_<model>`` per model (a matrix over ``seeds``, listing ``runtime``, its processed
    variant ``preprocess.variant.<model>`` (whose folder is its data dependency) and exactly the
    params of its ``reads``, so that ``-S train.lambda_sp=50`` re-trains sparse_gan only; one
    stage per model since DVC cannot interpolate a list of params per matrix item), and
    ``score``, a matrix over (model, seed) that reads its model's variant (its dependency is
    ``data/processed``, both variants: DVC cannot look a param up by the matrix item). Each stage's run record (timings, MLflow run:
    :data:`sparsegan.layout.RUNS`) is a cached metrics file, apart from its output: a
    ``cache: false`` output would turn DVC's run-cache off for the stage."""
    lines = [BEGIN]
    for s in specs:
        variant = f"preprocess.variant.{s.name}"
        lines += [f"  train_{s.name}:", "    matrix:", "      seed: ${seeds}",
                  f"    cmd: python stages/train.py {s.name} ${{item.seed}}", "    deps:"]
        lines += [f"      - {d}" for d in TRAIN_DEPS] + [f"      - data/processed/${{{variant}}}"]
        lines += ["    params:", "      - runtime", f"      - {variant}"]
        lines += [f"      - {r}" for r in s.reads]
        lines += ["    outs:", f"      - models/{s.name}/s${{item.seed}}",
                  "    metrics:  # the run (timings, MLflow run), apart from the model",
                  f"      - reports/runs/train/{s.name}-s${{item.seed}}.json", ""]
    lines += ["  score:", "    matrix:", f"      model: [{', '.join(s.name for s in specs)}]",
              "      seed: ${seeds}", "    cmd: python stages/score.py ${item.model} ${item.seed}",
              "    deps:"] + [f"      - {d}" for d in SCORE_DEPS] + [
              "    params:", "      - runtime", "      - score", "    outs:",
              "      - scores/${item.model}/s${item.seed}", "    metrics:",
              "      - reports/runs/score/${item.model}-s${item.seed}.json", ""]
    return "\n".join(lines + [END]) + "\n"


def write_dvc_yaml(path: Path) -> bool:
    """Replace the generated block of ``path`` (dvc.yaml); True if it changed."""
    text = path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        raise SystemExit(f"{path}: no block written from sparsegan/spec.py (the lines "
                         f"{BEGIN.strip()!r} ... {END.strip()!r}); restore it from git")
    new = text[:start] + spec_stages_yaml() + text[end + len(END) + 1:]
    path.write_text(new)
    return new != text


def missing_variants(params_file: Path, specs: tuple[ModelSpec, ...] = MODEL_SPECS) -> list[str]:
    """The models without ``preprocess.variant.<model>`` in ``params_file``: DVC resolves each
    train stage's data folder from that key, so a model added without it stops ``dvc repro``."""
    import yaml

    raw = yaml.safe_load(Path(params_file).read_text()) if Path(params_file).is_file() else {}
    variant = ((raw or {}).get("preprocess") or {}).get("variant") or {}
    return [s.name for s in specs if s.name not in variant]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("dvc.yaml")
    print(f"{target}: {'updated' if write_dvc_yaml(target) else 'already up to date'}")
    params_file = target.with_name("params.yaml")
    missing = missing_variants(params_file)
    if missing:
        raise SystemExit(f"error: {params_file}: add " + ", ".join(
            f"preprocess.variant.{m}: raw" for m in missing) + " (raw | filled: the processed "
            "data its train stage reads)")
