"""Typed, validated parameters: one dataclass per section of ``params.yaml``.

Every stage calls :func:`load_params` before doing any work. An unknown key (a typo), a value of
the wrong type, or a value out of range raises :class:`ParamError` with a one-line message that
names the key and what is allowed, e.g. ``params.yaml: train.lambda_sp = -1: must be >= 0``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The trained models and what follows from them: one place, sparsegan/spec.py.
from .spec import DEFAULT_ROWS, MODEL_SCORES, MODEL_SPECS, MODELS
from .layout import VARIANTS

CLASSES = ("NORMAL", "CNV", "DME", "DRUSEN")
DISEASES = ("CNV", "DME", "DRUSEN")
class ParamError(ValueError):
    """A param in params.yaml is missing, misspelt, of the wrong type or out of range."""


def _check(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           choices: tuple[str, ...] | None = None, parse: Any = None,
           default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a range or a set of allowed values, checked at load time;
    ``parse(value, key)`` converts a value that no plain type describes (e.g. number or mapping)."""
    kw: dict[str, Any] = {"metadata": {"ge": ge, "gt": gt, "le": le, "choices": choices,
                                       "parse": parse}}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    return field(**kw)


@dataclass(frozen=True)
class SyntheticParams:
    """Counts of the embedded synthetic OCT generator (OCT2017 layout, see ``data/synthetic.py``)."""

    seed: int = 0
    train_normal: int = _check(ge=1, default=1400)
    train_per_disease: int = _check(ge=1, default=150)
    test_per_class: int = _check(ge=1, default=250)
    scans_per_patient: int = _check(ge=1, default=2)
    workers: int = _check(ge=0, default=0)  # 0: all cores
    # difficulty: each lesion's severity (size and contrast) is drawn uniformly in this range
    severity_min: float = _check(ge=0.0, le=1.0, default=0.05)
    severity_max: float = _check(ge=0.0, le=1.0, default=1.0)

    def __post_init__(self) -> None:
        if self.severity_min > self.severity_max:
            raise ParamError(f"params.yaml: data.synthetic.severity_min = {self.severity_min} is "
                             f"above severity_max = {self.severity_max}")


@dataclass(frozen=True)
class Oct2017Params:
    """Where to download OCT2017 from; ``url``/``sha256`` override the version's defaults."""

    version: str = _check(choices=("v3", "v2"), default="v3")
    url: str = ""
    sha256: str = ""
    retries: int = _check(ge=0, default=5)


def _per_disease(value: Any, key: str) -> int | dict[str, int]:
    """A count for every disease class, a mapping ``{CNV: 150, DME: 18}`` (other classes: 0), or
    ``all`` (every disease image of the training pool)."""
    def count(v: Any, k: str) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ParamError(f"params.yaml: {k} = {v!r}: must be a whole number >= 0 (or all)")
        return v
    if value == "all":  # every disease scan of the training pool goes to validation
        return value
    if isinstance(value, dict):
        out = {}
        for cls, v in value.items():
            if str(cls).upper() not in DISEASES:
                raise ParamError(f"params.yaml: {key}.{cls}: not a disease class; allowed "
                                 f"{', '.join(DISEASES)}")
            out[str(cls).upper()] = count(v, f"{key}.{cls}")
        return out
    if count(value, key) < 1:
        raise ParamError(f"params.yaml: {key} = {value!r}: must be >= 1 (or a mapping per class, "
                         f"e.g. {{CNV: 100, DME: 0}})")
    return value


@dataclass(frozen=True)
class SplitParams:
    """How train/val/test are drawn (docs/design.md, section 2). The paper uses 1,000 per class in val.

    ``val_per_disease``: a number (each disease class present gets that many validation images;
    a class with no image at all is left out), a mapping per class (a class not named gets none),
    or ``all`` (every disease image of the training pool: training sees normals only, so a
    real tree's disease scans are all validation; the rule the real-data studies use).
    ``seed`` draws the split; the top-level ``seed`` is the training seed, so that training seeds
    can be compared on one split.
    """

    protocol: str = _check(choices=("patient", "paper"), default="patient")
    seed: int = 0
    val_normal: int = _check(ge=1, default=1000)
    val_per_disease: int | dict[str, int] | str = _check(parse=_per_disease, default=1000)
    test_per_class: int = _check(ge=0, default=0)  # patient protocol only; 0: as many as official test


@dataclass(frozen=True)
class DataParams:
    source: str = _check(choices=("synthetic", "oct2017", "folder"), default="synthetic")
    folder: str = ""  # data.source=folder: the user's OCT2017 copy, used in place
    patients: str = ""  # data.source=folder: a patients.csv (file, patient); "": look in the tree
    image_size: int = _check(ge=16, default=64)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    oct2017: Oct2017Params = field(default_factory=Oct2017Params)
    split: SplitParams = field(default_factory=SplitParams)

    def __post_init__(self) -> None:
        if encoder_blocks(self.image_size) is None:
            ok = [s for s in range(16, 4 * self.image_size + 64) if encoder_blocks(s)]
            below = [s for s in ok if s < self.image_size][-1:]
            above = [s for s in ok if s > self.image_size][:1]
            raise ParamError(f"params.yaml: data.image_size = {self.image_size}: the encoder's "
                             f"stride-2 blocks need a size divisible by 2**n, n = "
                             f"floor(log2(size / 7)); nearest allowed: "
                             f"{' or '.join(map(str, below + above))} (e.g. 32, 64, 128, 224)")


def encoder_blocks(image_size: int) -> int | None:
    """The encoder depth rule of ``sparsegan.models.networks.num_blocks`` (kept free of torch so
    that params load fast): the number of stride-2 blocks, or None when ``image_size`` is invalid.
    ``tests/reliability`` checks that both agree."""
    if image_size < 1:
        return None
    n = int(math.floor(math.log2(image_size / 7)))
    return n if n >= 1 and image_size % (2**n) == 0 else None


# preprocess.variant: the processed data each model trains and scores on (sparsegan.layout.VARIANTS:
# raw, or filled = white registration corners filled with background, data/preprocess.py). raw by
# default; the real-data recipe fills them for AnoGAN and f-AnoGAN, which gained 0.10 validation
# AUC from it, while every reconstruction model scored higher on raw scans (docs/results.md).
VariantParams = dataclasses.make_dataclass(
    "VariantParams", [(m, str, _check(choices=VARIANTS, default="raw")) for m in MODELS],
    frozen=True, namespace={"__module__": __name__,
                            "__doc__": "The preprocessed variant of each model (one key per model)."})


@dataclass(frozen=True)
class PreprocessParams:
    workers: int = _check(ge=0, default=0)  # 0: all cores
    variant: VariantParams = field(default_factory=VariantParams)

    def variant_of(self, model: str) -> str:
        """The processed variant ``model`` trains and scores on (``data/processed/<variant>``)."""
        return getattr(self.variant, model)

    def fills_corners(self, model: str) -> bool:
        """Whether ``model``'s scans get their registration corners filled."""
        return self.variant_of(model) == "filled"


@dataclass(frozen=True)
class ModelParams:
    """Width of the shared generator / discriminator (docs/design.md, section 1)."""

    base_channels: int = _check(ge=1, default=16)  # b: encoder widths b, 2b, 4b, ...; 64 in the paper
    # batch norm in G_en, G_de, D and the baselines' generators ("batch", pix2pix/DCGAN) or none
    # (no batch norm, conv biases instead): under DDP on CPU, where BN cannot be synchronised
    norm: str = _check(choices=("batch", "none"), default="batch")


@dataclass(frozen=True)
class SrnParams:
    """The Sparsity Regularization Net of sparse_gan (Sec. 2.2)."""

    steps: int = _check(ge=1, default=3)  # T, unrolled ISTA steps
    code_channels: int = _check(ge=0, default=0)  # K; 0: same as the latent's channels
    l1: float = _check(ge=0.0, default=0.1)  # lambda in L_scl (eq. 3)
    # W_d's atoms divided by their norms (dictionary learning's usual constraint)
    unit_atoms: bool = False
    # L_sp on H_in / RMS(H_in) per image, so that it can only be lowered by a sparser code, not by
    # shrinking H (batch norm in G_de makes L_re and L_adv blind to H's scale)
    scale_invariant: bool = False


@dataclass(frozen=True)
class TrainParams:
    """Training of the generator-based models (Auto-Encoder, pix2pix, Sparse-GAN; the batch of
    every model); lambdas as in the paper (Sec. 2.3)."""

    epochs: int = _check(ge=1, default=30)
    batch_size: int = _check(ge=1, default=32)
    lr: float = _check(gt=0.0, default=0.001)
    # share of the epochs at the end over which lr falls linearly towards 0 (pix2pix's schedule:
    # constant, then linear decay); 0: constant lr
    lr_decay: float = _check(ge=0.0, le=1.0, default=0.5)
    beta1: float = _check(ge=0.0, le=1.0, default=0.5)
    lambda_re: float = _check(ge=0.0, default=20.0)
    lambda_adv: float = _check(ge=0.0, default=1.0)
    lambda_sp: float = _check(ge=0.0, default=50.0)


@dataclass(frozen=True)
class RuntimeParams:
    """Where and how the code runs, not what it learns: a change re-runs, but no result should
    depend on it beyond floating-point rounding (every stage that trains or scores lists it)."""

    device: str = _check(choices=("auto", "cpu", "cuda"), default="auto")
    num_threads: int = _check(ge=0, default=0)  # 0: torch's default
    # torch.compile the networks (in place; CUDA mainly, on CPU it needs a C++ compiler; f-AnoGAN's
    # critic stays eager: the gradient penalty's double backward cannot be compiled)
    compile: bool = False
    # > 1: data-parallel training on N processes (GPUs) under torchrun; train.batch_size stays the
    # global batch and must be divisible by N (see sparsegan/distributed.py)
    nproc_per_node: int = _check(ge=1, default=1)
    score_batch: int = _check(ge=1, default=32)  # scans per batch when scoring (eval mode)


# The sections of the models of sparsegan/spec.py (each spec's ``params_class``): a new model's
# dataclass goes here, beside the others.


@dataclass(frozen=True)
class AnoganParams:
    """AnoGAN's training (Schlegl et al. 2017): a DCGAN on normal scans; its search is in
    :class:`AnoganSearchParams` (``score.anogan``), so that a search change re-scores only."""

    latent_dim: int = _check(ge=1, default=64)
    epochs: int = _check(ge=1, default=30)
    lr: float = _check(gt=0.0, default=0.0002)


@dataclass(frozen=True)
class AnoganSearchParams:
    """AnoGAN's scoring: a gradient search over z per test image (sparsegan/scoring.py)."""

    search_steps: int = _check(ge=1, default=50)
    search_lr: float = _check(gt=0.0, default=0.05)
    # z_1 of the search, the same for every image so that a score depends neither on the call nor
    # on the batch: "sample" (one draw of N(0, I) from a generator seeded with 0, a typical z as the
    # paper's random start) or "zeros" (the prior's mean)
    search_init: str = _check(choices=("sample", "zeros"), default="sample")
    weight: float = _check(ge=0.0, le=1.0, default=0.1)  # l: (1-l) residual + l discrimination


@dataclass(frozen=True)
class ScoreParams:
    """Knobs read only when a trained model scores scans (never by training)."""

    anogan: AnoganSearchParams = field(default_factory=AnoganSearchParams)


@dataclass(frozen=True)
class FanoganParams:
    """f-AnoGAN (Schlegl et al. 2019): WGAN-GP, then an izif encoder with G and D frozen.

    ``epochs`` counts critic passes over the data; G takes one step per ``n_critic`` critic steps,
    so at the other variants' 30 epochs G gets a fifth of their updates and is still far from the
    data (the encoder then fits a poor G and the score is near chance): hence more epochs.
    """

    latent_dim: int = _check(ge=1, default=64)
    epochs: int = _check(ge=1, default=100)
    encoder_epochs: int = _check(ge=1, default=20)
    lr: float = _check(gt=0.0, default=0.0002)
    n_critic: int = _check(ge=1, default=5)
    gp_weight: float = _check(ge=0.0, default=10.0)
    kappa: float = _check(ge=0.0, default=1.0)


@dataclass(frozen=True)
class CalibrateParams:
    criterion: str = _check(choices=("accuracy", "youden", "f1", "sensitivity"), default="youden")
    target_sensitivity: float = _check(gt=0.0, le=1.0, default=0.95)  # criterion=sensitivity


def _seeds(value: Any, key: str) -> tuple[int, ...]:
    """A non-empty list of distinct whole numbers (one trained model per seed)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ParamError(f"params.yaml: {key} = {value!r}: must be a non-empty list of whole "
                         f"numbers >= 0, e.g. [0] or [0, 1, 2]")
    if len(set(value)) != len(value):
        raise ParamError(f"params.yaml: {key} = {value!r}: a seed is listed twice")
    return tuple(value)


def _rows(value: Any, key: str) -> dict[str, tuple[str, str]]:
    """``{row: [model, score]}``, each model one of :data:`MODELS` and each score one it gives."""
    if not isinstance(value, dict) or not value:
        raise ParamError(f"params.yaml: {key} must be a mapping row -> [model, score], e.g. "
                         f"sparse_gan: [sparse_gan, latent]")
    rows = {}
    for row, pair in value.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
            raise ParamError(f"params.yaml: {key}.{row} = {pair!r}: must be [model, score], e.g. "
                             f"[sparse_gan, latent]")
        model, score = pair
        if model not in MODELS:
            raise ParamError(f"params.yaml: {key}.{row}: model {model!r} is not one of "
                             f"{', '.join(MODELS)}")
        if score not in MODEL_SCORES[model]:
            raise ParamError(f"params.yaml: {key}.{row}: {model} gives the scores "
                             f"{', '.join(MODEL_SCORES[model])}, not {score!r}")
        rows[str(row)] = (model, score)
    return rows


def _check_folder(self) -> None:
    if self.data.source == "folder" and not self.data.folder:
        raise ParamError("params.yaml: data.folder is empty: set it to your OCT2017 copy "
                         "when data.source is 'folder'")


def _section_class(name: str) -> type:
    module, _, cls = name.partition(":")
    if module != __name__ or not dataclasses.is_dataclass(globals().get(cls)):
        raise ParamError(f"sparsegan/spec.py: params_class {name!r} is not a dataclass of "
                         f"sparsegan/params.py; add the section's dataclass there")
    return globals()[cls]


_CORE_SECTIONS = [
    ("seeds", tuple[int, ...], _check(parse=_seeds, default=(0,))),
    ("rows", dict[str, tuple[str, str]], _check(parse=_rows,
                                                default_factory=lambda: dict(DEFAULT_ROWS))),
    ("data", DataParams, field(default_factory=DataParams)),
    ("preprocess", PreprocessParams, field(default_factory=PreprocessParams)),
    ("runtime", RuntimeParams, field(default_factory=RuntimeParams)),
    ("model", ModelParams, field(default_factory=ModelParams)),
    ("train", TrainParams, field(default_factory=TrainParams)),
]
_MODEL_SECTIONS = {s.section: _section_class(s.params_class) for s in MODEL_SPECS
                   if s.section not in {name for name, _, _ in _CORE_SECTIONS}}
# Every section of params.yaml: the core ones, each model's own (from sparsegan/spec.py), then
# the scoring knobs and the calibration.
Params = dataclasses.make_dataclass(
    "Params",
    _CORE_SECTIONS
    + [(name, cls, field(default_factory=cls)) for name, cls in _MODEL_SECTIONS.items()]
    + [("score", ScoreParams, field(default_factory=ScoreParams)),
       ("calibrate", CalibrateParams, field(default_factory=CalibrateParams))],
    frozen=True, namespace={"__post_init__": _check_folder, "__module__": __name__,
                            "__doc__": "Every section of params.yaml, parsed and checked."})


def check_sections(raw: dict[str, Any], params: Params) -> None:
    """A model named in params.yaml's ``rows`` needs its own section in the file (its
    hyper-parameters are never silently the defaults): ParamError naming the section."""
    if not isinstance(raw, dict) or "rows" not in raw:
        return
    used = dict.fromkeys(model for model, _ in params.rows.values())
    for spec in MODEL_SPECS:
        if spec.name in used and spec.section.split(".")[0] not in raw:
            raise ParamError(f"params.yaml: no {spec.section}: section, the hyper-parameters of "
                             f"model {spec.name} (sparsegan/spec.py), which rows use; add it "
                             f"(the defaults are in sparsegan/params.py, {spec.params_class})")


def check_model(model: str) -> str:
    """``model`` (a stage's argument) if it is one of :data:`MODELS`, else ParamError."""
    if model not in MODELS:
        raise ParamError(f"unknown model {model!r}: allowed {', '.join(MODELS)}")
    return model


def check_row(row: str, params: Params) -> tuple[str, str]:
    """(model, score) of ``row`` (a stage's argument), else ParamError naming the rows."""
    if row not in params.rows:
        raise ParamError(f"unknown row {row!r}: params.yaml's rows are {', '.join(params.rows)}")
    return params.rows[row]


def check_seed(seed: str | int) -> int:
    """A stage's seed argument as an int (ParamError if it is not a whole number)."""
    try:
        value = int(seed)
    except (TypeError, ValueError):
        raise ParamError(f"seed {seed!r}: must be a whole number (one of params.yaml's seeds)") from None
    if value < 0:
        raise ParamError(f"seed {seed!r}: must be >= 0")
    return value


# Keys of an earlier layout -> where they are now, and why.
MOVED = {f"train.{k}": (f"runtime.{k}", "the runtime settings have their own section")
         for k in ("device", "num_threads", "compile", "nproc_per_node")} | {
    "preprocess.fill_corners": ("preprocess.variant.<model>: raw | filled",
                                "each model has its own preprocessing")}


def _parse(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamError(f"params.yaml: {prefix or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        moved = MOVED.get(f"{where}{unknown[0]}")
        if moved:
            raise ParamError(f"params.yaml: {where}{unknown[0]} is now {moved[0]} "
                             f"({moved[1]}); move it there")
        raise ParamError(f"params.yaml: unknown key {where}{unknown[0]}: allowed keys are "
                         f"{', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(hints[name], value, key, fields[name].metadata)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, meta: typing.Mapping[str, Any]) -> Any:
    if meta.get("parse"):
        return meta["parse"](value, key)
    if dataclasses.is_dataclass(hint):
        return _parse(hint, value, key)
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(f"params.yaml: {key} must be a mapping, got {value!r}")
        return {k: _convert(typing.get_args(hint)[1], v, f"{key}.{k}", {}) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ParamError(f"params.yaml: {key} = {value!r}: must be a list of names")
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported param type {hint} for {key}")
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[hint]
    if not ok:
        raise ParamError(f"params.yaml: {key} = {value!r}: must be of type {hint.__name__}")
    value = hint(value)
    if meta.get("choices") and value not in meta["choices"]:
        raise ParamError(f"params.yaml: {key} = {value!r}: allowed values are "
                         f"{', '.join(meta['choices'])}")
    for bound, fails, word in (("ge", lambda v, b: v < b, ">="), ("gt", lambda v, b: v <= b, ">"),
                               ("le", lambda v, b: v > b, "<=")):
        if meta.get(bound) is not None and fails(value, meta[bound]):
            raise ParamError(f"params.yaml: {key} = {value!r}: must be {word} {meta[bound]}")
    return value


def flatten_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every section and key of a params dataclass: ["seed", "train", "train.lr", ...]."""
    keys = []
    for f in dataclasses.fields(obj):
        key = prefix + f.name
        keys.append(key)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += flatten_keys(value, key + ".")
    return keys


def parse_params(raw: dict[str, Any]) -> Params:
    """Build :class:`Params` from a parsed params.yaml mapping (missing keys take defaults)."""
    return _parse(Params, raw or {}, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: not found; run the stage from the repository root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    params = parse_params(raw)
    check_sections(raw, params)
    return params
