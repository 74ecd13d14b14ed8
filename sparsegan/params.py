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

CLASSES = ("NORMAL", "CNV", "DME", "DRUSEN")
DISEASES = ("CNV", "DME", "DRUSEN")
VARIANTS = ("autoencoder", "anogan", "fanogan", "pix2pix_image", "pix2pix_latent", "sparse_gan")

# The params each variant's training reads beyond the ones all variants share (dvc.yaml lists
# those): DVC cannot interpolate a list into a stage's `params`, so every variant names exactly
# READ_SLOTS keys (a repeated key is harmless). This is what makes `-S train.lambda_sp=50`
# re-run sparse_gan only.
READ_SLOTS = 3
DEFAULT_READS = {
    "autoencoder": ("train.lambda_re",) * 3,
    "anogan": ("anogan",) * 3,
    "fanogan": ("fanogan",) * 3,
    "pix2pix_image": ("train.lambda_adv",) * 3,
    "pix2pix_latent": ("train.lambda_adv",) * 3,
    "sparse_gan": ("train.lambda_adv", "train.lambda_sp", "srn"),
}


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
    train_normal: int = _check(ge=1, default=2400)
    train_per_disease: int = _check(ge=1, default=150)
    test_per_class: int = _check(ge=1, default=250)
    scans_per_patient: int = _check(ge=1, default=6)
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
    """A count for every disease class, or a mapping ``{CNV: 150, DME: 18}`` (other classes: 0)."""
    def count(v: Any, k: str) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ParamError(f"params.yaml: {k} = {v!r}: must be a whole number >= 0")
        return v
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
    a class with no image at all is left out) or a mapping per class (a class not named gets none).
    ``seed`` draws the split; the top-level ``seed`` is the training seed, so that training seeds
    can be compared on one split.
    """

    protocol: str = _check(choices=("patient", "paper"), default="patient")
    seed: int = 0
    val_normal: int = _check(ge=1, default=1000)
    val_per_disease: int | dict[str, int] = _check(parse=_per_disease, default=1000)
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


@dataclass(frozen=True)
class PreprocessParams:
    workers: int = _check(ge=0, default=0)  # 0: all cores
    # fill white registration corners with background (data/preprocess.py: fill_corners); off by
    # default: on real validation scans every reconstruction model scored higher without it
    fill_corners: bool = False


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
    """Training of the generator-based variants; lambdas as in the paper (Sec. 2.3)."""

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
    device: str = _check(choices=("auto", "cpu", "cuda"), default="auto")
    num_threads: int = _check(ge=0, default=0)  # 0: torch's default
    # torch.compile the networks (in place; CUDA mainly, on CPU it needs a C++ compiler; f-AnoGAN's
    # critic stays eager: the gradient penalty's double backward cannot be compiled)
    compile: bool = False
    # > 1: data-parallel training on N processes (GPUs) under torchrun; train.batch_size stays the
    # global batch and must be divisible by N (see sparsegan/distributed.py)
    nproc_per_node: int = _check(ge=1, default=1)


@dataclass(frozen=True)
class AnoganParams:
    """AnoGAN (Schlegl et al. 2017): DCGAN, then a gradient search over z per test image."""

    latent_dim: int = _check(ge=1, default=64)
    epochs: int = _check(ge=1, default=30)
    lr: float = _check(gt=0.0, default=0.0002)
    search_steps: int = _check(ge=1, default=50)
    search_lr: float = _check(gt=0.0, default=0.05)
    # z_1 of the search, the same for every image so that a score depends neither on the call nor
    # on the batch: "sample" (one draw of N(0, I) from a generator seeded with 0, a typical z as the
    # paper's random start) or "zeros" (the prior's mean)
    search_init: str = _check(choices=("sample", "zeros"), default="sample")
    weight: float = _check(ge=0.0, le=1.0, default=0.1)  # l: (1-l) residual + l discrimination


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


@dataclass(frozen=True)
class Params:
    seed: int = 0
    variants: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_READS))
    data: DataParams = field(default_factory=DataParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    model: ModelParams = field(default_factory=ModelParams)
    srn: SrnParams = field(default_factory=SrnParams)
    train: TrainParams = field(default_factory=TrainParams)
    anogan: AnoganParams = field(default_factory=AnoganParams)
    fanogan: FanoganParams = field(default_factory=FanoganParams)
    calibrate: CalibrateParams = field(default_factory=CalibrateParams)

    def __post_init__(self) -> None:
        known = set(flatten_keys(self))
        for v, reads in self.variants.items():
            if v not in VARIANTS:
                raise ParamError(f"params.yaml: variants.{v} is not a variant: allowed "
                                 f"{', '.join(VARIANTS)}")
            if len(reads) != READ_SLOTS:
                raise ParamError(f"params.yaml: variants.{v} must list exactly {READ_SLOTS} param "
                                 f"keys (repeat one to fill a slot), got {len(reads)}")
            for key in reads:
                if key not in known:
                    raise ParamError(f"params.yaml: variants.{v} names {key!r}, which is not a "
                                     f"param (e.g. train.lambda_sp, srn, anogan)")
        if self.data.source == "folder" and not self.data.folder:
            raise ParamError("params.yaml: data.folder is empty: set it to your OCT2017 copy "
                             "when data.source is 'folder'")


# Knobs read only when a trained model scores images: scoring uses their current values, every
# other param of a trained model comes from its model.pt (sparsegan.train.load_trained).
SCORING_KNOBS: dict[str, tuple[str, ...]] = {
    "anogan": ("search_steps", "search_lr", "search_init", "weight"),
}


def with_scoring(trained: Params, current: Params) -> Params:
    """``trained`` with the :data:`SCORING_KNOBS` of ``current``."""
    for section, keys in SCORING_KNOBS.items():
        cur = getattr(current, section)
        new = dataclasses.replace(getattr(trained, section), **{k: getattr(cur, k) for k in keys})
        trained = dataclasses.replace(trained, **{section: new})
    return trained


def check_variant(variant: str) -> str:
    """``variant`` (a stage's argument) if it is one of :data:`VARIANTS`, else ParamError."""
    if variant not in VARIANTS:
        raise ParamError(f"unknown variant {variant!r}: allowed {', '.join(VARIANTS)}")
    return variant


def _parse(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamError(f"params.yaml: {prefix or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
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
    return parse_params(raw)
