"""``sparsegan predict``: screen new OCT B-scans with a trained, calibrated row of the report.

Usage (from the repository root, after ``dvc repro``)::

    sparsegan predict --row sparse_gan --out preds/ scans/ more/scan.png
    python -m sparsegan.predict predict --row sparse_gan --seed 1 --out preds/ scans/

Options: ``--seed`` (the training seed; default: the lowest one calibrated), ``--calibration
reports/rows`` (reads ``<calibration>/<row>/calibration/s<seed>.json``: the phi chosen on the
validation set, the trained model and score of the row), ``--models models`` (reads
``<models>/<model>/s<seed>/model.pt``), ``--scores scores`` (reads the score knobs the score
stage recorded, ``<scores>/<model>/s<seed>/settings.json``), ``--model-uri`` (instead of the
three: a registered screening model, e.g. ``models:/sparse-gan-oct-sparse_gan@champion``, see
:mod:`sparsegan.serving`), ``--batch-size`` (default: 32), ``--device``
(default: auto), ``--alpha`` (heatmap opacity, 0.45). No params.yaml is read: ``model.pt``
describes itself (architecture, image size, the preprocessing it was trained on).

Inputs are image files, DICOM files or folders; folders are searched recursively for ``.jpeg
.jpg .png .tif .tiff .bmp .dcm .dicom`` (any case; hidden files skipped; other files are listed
as ignored). A file named explicitly is always tried (as DICOM when it has the DICM preamble).
Every frame of a DICOM file (e.g. an Ophthalmic Tomography volume) is one B-scan
(:mod:`sparsegan.data.dicom`); its rows carry the 1-based ``frame``. Any size and mode is accepted and converted exactly as in training
(:func:`sparsegan.data.preprocess.load_gray`: RGB -> luma, alpha composited on black, 16-bit
stretched from its own min..max, resized to the model's image size without keeping the aspect
ratio, white registration corners filled when the model was trained on the ``filled`` variant,
``preprocess.variant.<model>``).

Writes into ``--out``:

``predictions.csv``  one row per scored image: ``file`` (as found), ``frame`` (DICOM frames;
                     empty for image files), ``patient`` (see below), ``score`` (the row's
                     anomaly score), ``phi``, ``decision`` (``disease`` when ``score > phi``, else
                     ``normal``, eq. 5) and ``overlay`` (the PNG's path inside ``--out``)
``overlays/...``     per image, the anomaly map (``--map``; default: the one with the best pixel
                     AUROC on the validation lesion masks, the calibration's ``map``, else
                     the residual activation map of the latent score, else ``|I_in - I_re|``;
                     the paper's AAM with ``--map aam``) min-max normalised,
                     upsampled to the scan's own resolution, coloured with matplotlib's ``jet``
                     and blended over the scan, with the decision, score and phi written on it:
                     an RGB PNG of the input's size (``--side-by-side``: the plain scan on the
                     left, twice as wide). Folder inputs keep their sub-folders:
                     ``overlays/<folder>/<sub>/<file name>.png``.

``patients.csv``     one row per patient or volume: ``patient, scans, score, aggregation, phi,
                     decision``, the patient score being the aggregation (max, mean, top-3 mean)
                     of its scans' scores chosen on validation patients (the calibration's
                     ``patient`` rule), decided at the scans' phi: a patient with one scan gets
                     its scan's decision, and with ``max`` a patient is ``disease`` exactly when
                     one of its scans is. A scan's patient is the one of its
                     OCT2017 name (``<CLASS>-<patient>-<n>``), else its DICOM series (a volume),
                     else its sub-folder inside a folder input (a folder per patient), else the
                     file itself.

Images are decoded one by one and scored in batches. A file that cannot be used (missing,
unreadable, not an image, truncated, too small, ...) is reported on stderr as ``error: <file>:
<reason>`` and the others are still processed.

Exit status: 0 when every input was scored, 1 when any failed (or none was found), 2 for a usage
error (unknown row, missing, old or damaged model, missing calibration), with one
line naming what to run, e.g. ``dvc repro train_sparse_gan``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layout
from .data import DICOM_EXTENSIONS, IMAGE_EXTENSIONS

SUPPORTED = " ".join(sorted(IMAGE_EXTENSIONS | DICOM_EXTENSIONS))



class UsageError(Exception):
    """A problem with the command line or the trained artefacts: exit status 2."""


@dataclass(frozen=True)
class Item:
    path: Path  # the file, as found (input argument joined with the relative path)
    overlay: Path  # where its overlay goes, relative to --out
    frame: int | None = None  # 1-based frame of a DICOM file (one B-scan of its volume)
    patient: str = ""  # its patient / volume (see collect_inputs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsegan",
                                     description="Sparse-GAN OCT anomaly detection tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("predict", help="score image files or folders with a trained row",
                       description="Score OCT B-scans with a trained, calibrated row of the "
                                   "report; write predictions.csv and an anomaly-map overlay "
                                   "per image, and patients.csv: a patient (volume) is disease "
                                   "when the aggregation of its scans' scores chosen on "
                                   "validation patients exceeds the same phi as a scan, so a "
                                   "patient with one scan gets its scan's decision.")
    p.add_argument("--row", "--variant", dest="row",
                   help="a row of params.yaml's rows, e.g. sparse_gan (required without "
                        "--model-uri)")
    p.add_argument("--seed", type=int, default=None,
                   help="the training seed (default: the lowest calibrated one)")
    p.add_argument("--model-uri", help="an MLflow screening model instead of --models and "
                                       "--calibration, e.g. models:/sparse-gan-oct-sparse_gan@champion")
    p.add_argument("--models", type=Path, default=layout.MODELS,
                   help="folder holding <model>/s<seed>/model.pt (default: models)")
    p.add_argument("--calibration", type=Path, default=layout.ROWS,
                   help="folder holding <row>/calibration/s<seed>.json (default: reports/rows)")
    p.add_argument("--scores", type=Path, default=layout.SCORES,
                   help="folder holding <model>/s<seed>/settings.json, the score knobs the score "
                        "stage used (default: scores)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per scoring batch (default: 32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default: auto (CUDA when there is one)")
    p.add_argument("--alpha", type=float, default=0.45, help="heatmap opacity (default: 0.45)")
    p.add_argument("--map", choices=("auto", "aam_residual", "aam", "difference"), default="auto",
                   help="the map drawn: auto = the one that localised best on the validation "
                        "lesion masks (the calibration), else the residual activation map of the "
                        "latent score, else the difference map |I_in - I_re|")
    p.add_argument("--side-by-side", action="store_true",
                   help="put the plain scan left of the overlay (the PNG is twice as wide)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    return parser


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def collect_inputs(inputs: list[str | Path]) -> tuple[list[Item], list[tuple[str, str]], list[str]]:
    """``(items to score, failures (name, reason), ignored non-image files)`` for the inputs; a
    DICOM file gives one item per frame (its header is read here)."""
    from .data.dicom import is_dicom, read_header
    from .data.oct2017 import patient_from_name
    from .data.preprocess import SkipImage

    items: list[Item] = []
    failures: list[tuple[str, str]] = []
    ignored: list[str] = []
    seen: set[Path] = set()
    taken: set[Path] = set()

    def add_one(path: Path, overlay: Path, frame: int | None, patient: str) -> None:
        candidate, n = overlay, 1
        while candidate in taken:  # two inputs with the same name: keep both overlays
            n += 1
            candidate = overlay.with_name(f"{overlay.stem}-{n}{overlay.suffix}")
        taken.add(candidate)
        items.append(Item(path, candidate, frame, patient))

    def add(path: Path, overlay: Path, folder: str = "") -> None:
        """``folder``: the file's sub-folder inside a folder input (a folder per patient)."""
        key = path.resolve()
        if key in seen:
            return
        seen.add(key)
        if path.suffix.lower() in DICOM_EXTENSIONS or is_dicom(path):
            try:
                n_frames, series = read_header(path)
            except SkipImage as exc:
                failures.append((str(path), str(exc)))
                return
            volume = f"series {series}" if series else str(path)
            for k in range(1, n_frames + 1):  # one B-scan per frame, one volume per series
                add_one(path, overlay.with_name(f"{overlay.stem}.f{k:03d}.png"), k, volume)
        else:
            add_one(path, overlay, None, patient_from_name(path.name) or folder or str(path))

    for arg in inputs:
        root = Path(arg)
        if root.is_dir():
            name = root.resolve().name or "input"
            found = False
            for f in sorted(root.rglob("*")):
                rel = f.relative_to(root)
                if _is_hidden(rel) or not f.is_file():
                    continue
                if f.suffix.lower() not in IMAGE_EXTENSIONS | DICOM_EXTENSIONS:
                    ignored.append(str(f))
                    continue
                found = True
                add(f, Path(name) / rel.parent / (rel.name + ".png"),
                    f"{name}/{rel.parent.as_posix()}" if rel.parent != Path(".") else "")
            if not found:
                failures.append((str(root), f"no images ({SUPPORTED}) in this folder"))
        elif root.exists():
            add(root, Path(root.name + ".png"))
        else:
            failures.append((str(root), "no such file or folder"))
    return items, failures, ignored


def overlay_image(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45,
                  cmap: str = "jet") -> np.ndarray:
    """uint8 ``(S, S, 3)``: ``heat`` (any range, min-max normalised) coloured by ``cmap`` and
    blended with opacity ``alpha`` over the uint8 grayscale ``gray`` ``(S, S)``."""
    import matplotlib

    h = np.asarray(heat, dtype=np.float64)
    lo, hi = float(h.min()), float(h.max())
    h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    color = matplotlib.colormaps[cmap](h)[..., :3]
    base = np.repeat(np.asarray(gray, dtype=np.float64)[..., None] / 255.0, 3, axis=2)
    out = (1 - alpha) * base + alpha * color
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def render_overlay(scan: np.ndarray, heat: np.ndarray, score: float, phi: float,
                   decision: str, alpha: float = 0.45, side_by_side: bool = False) -> np.ndarray:
    """uint8 RGB: the map ``heat`` (the model's S x S) upsampled bilinearly to the scan's own
    size ``(H, W)`` and blended over it (:func:`overlay_image`), with the decision, score and phi
    written in the top-left corner; with ``side_by_side`` the plain scan is on the left
    (``(H, 2W, 3)``), else the result has the scan's size."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = scan.shape
    up = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize(
        (w, h), Image.Resampling.BILINEAR))
    out = overlay_image(scan, up, alpha)
    if side_by_side:
        out = np.concatenate([np.repeat(scan[..., None], 3, axis=2), out], axis=1)
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(10, h // 28))
    text = f"{decision}  score {score:.4g}  phi {phi:.4g}"
    box = draw.textbbox((4, 4), text, font=font)
    draw.rectangle((0, 0, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
    draw.text((4, 4), text, font=font, fill=(255, 80, 80) if decision == "disease"
              else (255, 255, 255))
    return np.asarray(img)


def _model(folder: Path, model: str, device):
    """:func:`sparsegan.checkpoint.load_trained`, its errors as one-line usage errors."""
    from .checkpoint import CheckpointError, load_trained

    try:
        return load_trained(folder, device, model=model)
    except CheckpointError as exc:
        raise UsageError(f"{exc} (or pass --models)" if "no trained model" in str(exc)
                         else str(exc)) from None


def load_model_uri(uri: str, device):
    """``(trained model, screening config)`` of an MLflow screening model."""
    from .serving import resolve_model_uri

    try:
        folder, config = resolve_model_uri(uri)
    except Exception as exc:  # noqa: BLE001 - MLflow's errors for a bad URI vary; one line
        raise UsageError(f"--model-uri {uri}: {' '.join(str(exc).split())[:200]}") from None
    return _model(folder, config["model"], device), config


def find_calibration(row: str, seed: int | None, calibration_dir: Path) -> Path:
    """The calibration file of ``row`` and ``seed`` (None: the lowest seed calibrated) under
    ``calibration_dir``; UsageError naming what to run when there is none."""
    folder = calibration_dir / row / "calibration"
    if not (calibration_dir / row).is_dir():
        known = sorted(p.parent.name for p in Path(calibration_dir).glob("*/calibration"))
        if not known:
            raise UsageError(f"{calibration_dir}: no calibrated row; run `dvc repro "
                             f"calibrate@{row}` (or pass --calibration)")
        raise UsageError(f"unknown row {row!r}: {calibration_dir} holds {', '.join(known)} "
                         f"(or pass --calibration)")
    if seed is None:
        found = sorted(folder.glob("s*.json"), key=lambda p: int(p.stem[1:])
                       if p.stem[1:].isdigit() else 1 << 30)
        if not found:
            raise UsageError(f"{folder}: no calibrated seed of row {row!r}; run `dvc repro "
                             f"calibrate@{row}` (or pass --calibration)")
        return found[0]
    path = layout.calibration_file(row, seed, calibration_dir)
    if not path.is_file():
        raise UsageError(f"{path}: no calibrated phi; run `dvc repro calibrate@{row}` with "
                         f"this seed in params.yaml's seeds (or pass --calibration)")
    return path


def load_config(row: str, seed: int | None, calibration_dir: Path, scores_root: Path
                ) -> tuple[dict, Path]:
    """The screening config (:func:`sparsegan.screening.screening_config`) of one seed's
    calibration of ``row`` with the score stage's settings of its trained model, and the
    calibration file."""
    from .screening import ScreeningError, screening_config

    path = find_calibration(row, seed, calibration_dir)
    try:
        calibration = json.loads(path.read_text())
        settings = layout.scores_dir(calibration["model"], int(calibration["seed"]),
                                     scores_root) / layout.SETTINGS
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{path}: not a calibration of this version; re-run `dvc repro "
                         f"calibrate@{row}`") from None
    if not settings.is_file():
        raise UsageError(f"{settings}: no score settings of {calibration['model']} s"
                         f"{calibration['seed']}; run `dvc repro score` (or pass --scores)")
    try:
        score_settings = json.loads(settings.read_text())
    except (OSError, ValueError):
        raise UsageError(f"{settings}: not readable JSON; re-run `dvc repro score`") from None
    try:
        return screening_config(calibration, score_settings), path
    except ScreeningError as exc:
        raise UsageError(f"{path} with {settings}: {exc}; re-run `dvc repro calibrate@{row}`"
                         ) from None


def write_patients(path: Path, patients: list[tuple[str, int, float, str]],
                   aggregation: str, phi: float) -> int:
    """``patients.csv`` from :meth:`sparsegan.screening.Screener.patients`; returns the number
    of diseased patients."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient", "scans", "score", "aggregation", "phi", "decision"])
        for pid, n, score, decision in patients:
            writer.writerow([pid, n, repr(score), aggregation, repr(phi), decision])
    return sum(d == "disease" for *_, d in patients)


class _Frames:
    """The frames of the last DICOM file read (its items come in a row): each file decoded once."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.frames = None
        self.error = None

    def get(self, path: Path, frame: int):
        from .data.dicom import read_frames
        from .data.preprocess import SkipImage

        if path != self.path:
            self.path, self.frames, self.error = path, None, None
            try:
                self.frames = read_frames(path)
            except SkipImage as exc:
                self.error = exc
        if self.error is not None:
            raise self.error
        if frame > len(self.frames):
            raise SkipImage(f"frame {frame} missing (the pixel data holds {len(self.frames)})")
        return self.frames[frame - 1]


def load_item(item: Item, size: int, corners: bool, frames: _Frames) -> np.ndarray:
    """The item's B-scan converted as in training (uint8 [size, size]); SkipImage if unusable."""
    from .data.preprocess import gray_from_array, load_gray

    if item.frame is None:
        return load_gray(item.path, size, corners)
    return gray_from_array(frames.get(item.path, item.frame), size, corners)


def load_full(item: Item, frames: _Frames) -> np.ndarray:
    """The item's B-scan as 8-bit grayscale at its own resolution (for the overlay)."""
    from .data.preprocess import gray_full_from_array, read_gray

    if item.frame is None:
        return read_gray(item.path)
    return gray_full_from_array(frames.get(item.path, item.frame))


def map_name(choice: str, maps: dict, calibrated: str | None = None) -> str:
    """The map ``--map`` asks for among those the row's score gives (UsageError if it has none);
    ``auto``: the one calibration chose on validation lesion masks, else the residual activation
    map of the latent score, else the difference map."""
    if choice == "auto":
        if calibrated in maps:
            return calibrated
        return "aam_residual" if "aam_residual" in maps else "difference"
    if choice not in maps:
        raise UsageError(f"--map {choice}: this row gives only {', '.join(sorted(maps))}")
    return choice


def _batches(items: list[Item], size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _parse(argv: list[str] | None) -> argparse.Namespace | int:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return int(exc.code or 0)


def predict(args: argparse.Namespace) -> int:
    """The ``predict`` command; returns 0 or 1, raises :class:`UsageError`."""
    if args.row is None and not args.model_uri:
        raise UsageError("pass --row (a calibrated row under --calibration) or --model-uri")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.alpha <= 1:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")

    from PIL import Image  # after the cheap checks: a usage error answers at once

    from .checkpoint import resolve_device
    from .data.preprocess import SkipImage
    from .params import RuntimeParams
    from .screening import Screener

    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    if args.model_uri:
        model, cfg = load_model_uri(args.model_uri, device)
        source, calibration_file = args.model_uri, args.model_uri
    else:
        cfg, calibration_file = load_config(args.row, args.seed, args.calibration, args.scores)
        folder = layout.model_dir(cfg["model"], cfg["seed"], args.models)
        model = _model(folder, cfg["model"], device)
        source = folder / "model.pt"
    screener = Screener(model, cfg)
    phi, row, size, params = screener.phi, cfg["row"], model.image_size, model.params
    corners = params.preprocess.fills_corners(model.model)
    warning = screener.warning()
    if warning:
        print(f"warning: {source} was {warning}", file=sys.stderr)
    batch_size = args.batch_size or RuntimeParams().score_batch

    items, failures, ignored = collect_inputs(args.inputs)
    for name in ignored:
        print(f"note: {name}: ignored (not a {SUPPORTED} file)", file=sys.stderr)
    for name, reason in failures:
        print(f"error: {name}: {reason}", file=sys.stderr)

    def fail(name: str, reason: str) -> None:
        failures.append((name, reason))
        print(f"error: {name}: {reason}", file=sys.stderr)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    n_scored = n_disease = 0
    scored: list[tuple[str, float]] = []  # (patient, score) of every scored B-scan
    frames = _Frames()
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "frame", "patient", "score", "phi", "decision", "overlay"])
        for batch in _batches(items, batch_size):
            images, ok = [], []
            for item in batch:
                try:
                    images.append(load_item(item, size, corners, frames))
                    ok.append(item)
                except SkipImage as exc:
                    fail(str(item.path), str(exc))
            if not ok:
                continue
            result = screener.score(np.stack(images), device)
            scores = result.score.float().cpu().numpy()
            heat = result.maps[map_name(args.map, result.maps, cfg.get("map"))].float().cpu().numpy()
            for item, score, h in zip(ok, scores, heat):
                if not np.isfinite(score):
                    fail(str(item.path), f"the model gave a non-finite score ({score})")
                    continue
                decision = screener.decision(float(score))
                try:
                    full = load_full(item, frames)
                except SkipImage as exc:
                    fail(str(item.path), str(exc))
                    continue
                target = out / "overlays" / item.overlay
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(render_overlay(full, h[0], float(score), phi, decision, args.alpha,
                                               args.side_by_side)).save(target)
                writer.writerow([str(item.path), item.frame or "", item.patient,
                                 repr(float(score)), repr(phi), decision,
                                 (Path("overlays") / item.overlay).as_posix()])
                n_scored += 1
                scored.append((item.patient, float(score)))
                n_disease += decision == "disease"
            fh.flush()
    print(f"{n_scored} image(s) scored with {row} s{model.seed} (phi {phi:.6g}): {n_disease} disease, "
          f"{n_scored - n_disease} normal -> {out / 'predictions.csv'}"
          + (f"; {len(failures)} failed" if failures else ""))
    patients = screener.patients(scored)
    if patients:
        aggregation = cfg["patient"]["aggregation"]
        sick = write_patients(out / "patients.csv", patients, aggregation, phi)
        print(f"{len(patients)} patient(s) / volume(s) ({aggregation} of their scans' scores, "
              f"phi {phi:.6g}): {sick} disease -> {out / 'patients.csv'}")
    elif scored:
        print(f"note: {calibration_file} has no patient rule (no validation patients of both "
              f"classes): no patients.csv", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """``sparsegan <command> ...``; returns the exit status (see the module docstring)."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    try:
        return predict(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cli() -> None:
    """Console entry point ``sparsegan``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
