"""The scale study: does Sparse-GAN overtake its ablations as training grows toward the paper's?

Each **arm** is a set of ``dvc exp run -S`` overrides on top of the real-data split
(:mod:`sparsegan.studies.real`), run over the same training seeds as one DVC experiment named
``scale-<arm>`` in the repository's workspace. Only the reconstruction rows' calibrations are
targeted, so AnoGAN and f-AnoGAN are trained only in arms that change what they see (the image
size, :data:`ARMS` ``rows``); the ``b_*`` arms train only AnoGAN and f-AnoGAN, to choose their own
preprocessing and length (fair baselines). The test split is never scored by an arm.

Per arm (``studies/scale/arms/<arm>.json``, read from the workspace right after the run): every
targeted row's validation AUC per seed (scan and patient level), its per-class validation AUC
(NORMAL against one disease) with a patient-bootstrap interval, each model's training seconds
(from its run record) and training FLOPs (:func:`sparsegan.flops.training_flops`), the arm's wall
time, and the commit it ran on. :func:`collect` pairs the rows by seed into the endpoints of
:data:`PAIRS` (``results.json`` / ``results.md``) and draws ``scale.png``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from .. import layout
from ..params import DEFAULT_ROWS, DISEASES, load_params
from ..stats import paired_over_seeds, patient_bootstrap
from .real import real_overrides

RECONSTRUCTION_ROWS = ("autoencoder", "pix2pix_image", "pix2pix_latent", "sparse_gan",
                       "autoencoder_latent", "sparse_gan_image")
BASELINE_ROWS = ("anogan", "fanogan")

# arm -> overrides (as `dvc exp run -S key=value`) and ``rows``, the rows it trains and calibrates
# (default: the reconstruction rows; the baselines too where the arm changes their input).
# Training length first, then size, then the SRN's knobs, then the baselines' own arms.
# the baselines' corners filled (their own processed variant; the arms' records before commit
# bc96318 spell it preprocess.fill_corners=true, the switch of every model then)
BASELINES_FILLED = {f"preprocess.variant.{m}": "filled" for m in BASELINE_ROWS}
ARMS: dict[str, dict] = {
    "e60": {"overrides": {"train.epochs": "60"}},
    "e120": {"overrides": {"train.epochs": "120"}},
    "e240": {"overrides": {"train.epochs": "240"}},
    "e480": {"overrides": {"train.epochs": "480"}},
    "e60_w32": {"overrides": {"train.epochs": "60", "model.base_channels": "32"}},
    "e60_s112": {"overrides": {"train.epochs": "60", "data.image_size": "112"},
                 "rows": RECONSTRUCTION_ROWS + BASELINE_ROWS},
    "e60_lsp5": {"overrides": {"train.epochs": "60", "train.lambda_sp": "5"}},
    # the SRN's knobs at the longest measured length (the best arm); only Sparse-GAN re-trains
    "e240_lsp5": {"overrides": {"train.epochs": "240", "train.lambda_sp": "5"}},
    "e240_lsp200": {"overrides": {"train.epochs": "240", "train.lambda_sp": "200"}},
    "e240_code2x": {"overrides": {"train.epochs": "240", "srn.code_channels": "128"}},
    "e240_l1x10": {"overrides": {"train.epochs": "240", "srn.l1": "1.0"}},
    "e240_lsp5_code2x": {"overrides": {"train.epochs": "240", "train.lambda_sp": "5",
                                       "srn.code_channels": "128"}},
    # AnoGAN and f-AnoGAN at their default lengths: registration corners left in (as the
    # reconstruction rows see them) or filled, then twice as long
    "b_raw": {"overrides": {}, "rows": BASELINE_ROWS},
    "b_filled": {"overrides": {**BASELINES_FILLED}, "rows": BASELINE_ROWS},
    "b_filled_x2": {"overrides": {**BASELINES_FILLED, "anogan.epochs": "60",
                                  "fanogan.epochs": "200"}, "rows": BASELINE_ROWS},
}

# The endpoints: (name, row A, row B), each the per-seed difference A - B of validation AUC.
PAIRS = (
    ("Sparse-GAN - pix2pix #2 (latent)", "sparse_gan", "pix2pix_latent"),
    ("Sparse-GAN - pix2pix #1 (image)", "sparse_gan", "pix2pix_image"),
    ("Sparse-GAN - Auto-Encoder", "sparse_gan", "autoencoder"),
    ("Auto-Encoder latent - image", "autoencoder_latent", "autoencoder"),
    ("pix2pix latent - image", "pix2pix_latent", "pix2pix_image"),
    ("Sparse-GAN latent - image", "sparse_gan", "sparse_gan_image"),
)


def arm_rows(arm: str) -> tuple[str, ...]:
    return ARMS[arm].get("rows", RECONSTRUCTION_ROWS)


def arm_command(arm: str, seeds: list[int], folder: Path, patients: Path | None) -> list[str]:
    """The ``dvc exp run`` of one arm: the real split, the arm's overrides, its rows' calibrate
    stages as targets (so nothing else is trained and nothing is evaluated on test)."""
    if arm not in ARMS:
        raise SystemExit(f"arm {arm!r}: unknown; known arms: {', '.join(ARMS)}")
    overrides = {"seeds": "[" + ",".join(map(str, seeds)) + "]",
                 **real_overrides(folder, patients), **ARMS[arm]["overrides"]}
    name = f"scale-{arm}" if seeds == [0, 1, 2] else f"scale-{arm}-s{'-'.join(map(str, seeds))}"
    cmd = ["dvc", "exp", "run", "-n", name]
    for k, v in overrides.items():
        cmd += ["-S", f"{k}={v}"]
    return cmd + [f"calibrate@{row}" for row in arm_rows(arm)]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def _by_class(val, phi: float) -> dict[str, dict]:
    """NORMAL against each disease of the validation scans: AUC and 95% patient-bootstrap
    interval (scans without a patient are their own patient), with the counts."""
    out = {}
    normal = val["class"] == "NORMAL"
    for cls in DISEASES:
        keep = normal | (val["class"] == cls)
        sub = val[keep]
        n_sick = int((sub["class"] == cls).sum())
        if n_sick == 0:
            continue
        patients = [p or f"scan:{i}" for i, p in zip(sub.index, sub["patient"])]
        b = patient_bootstrap(sub["label"].to_numpy(), sub["score"].to_numpy(), patients, phi,
                              n_boot=1000, seed=0)
        out[cls] = {"auc": b.point["auc"], "low": b["auc"][0], "high": b["auc"][1],
                    "n": n_sick, "n_normal": int(normal.sum())}
    return out


def _training_seconds(root: Path, model: str, seed: int) -> float:
    """Seconds of one training, from its run record (``reports/runs/train``)."""
    record = layout.run_file("train", model, seed, root / layout.RUNS)
    return float(sum(e["seconds"] for e in json.loads(record.read_text())["epochs"]))


def read_arm(root: Path, arm: str, seeds: list[int]) -> dict:
    """What the arm's experiment left in the workspace ``root`` (see the module doc)."""
    import pandas as pd

    from ..flops import training_flops

    params = load_params(root / "params.yaml")
    rows = {}
    for row in arm_rows(arm):
        model, score = DEFAULT_ROWS[row]
        entry: dict = {"val_auc": {}, "val_patient_auc": {}, "val_auc_by_class": {}}
        for s in seeds:
            cal = json.loads(layout.calibration_file(row, s, root / layout.ROWS).read_text())
            entry["val_auc"][str(s)] = cal["validation"]["auc"]
            if "patient" in cal:
                entry["val_patient_auc"][str(s)] = cal["patient"]["validation"]["auc"]
            val = pd.read_csv(layout.scores_dir(model, s, root / layout.SCORES) / score / "val.csv",
                              dtype={"patient": str}, keep_default_na=False)
            entry["val_auc_by_class"][str(s)] = _by_class(val, cal["phi"])
        rows[row] = entry
    # every variant holds the same training scans (filled derives from raw)
    n_train = int(np.load(layout.processed_dir("raw", root / layout.PROCESSED) / "train.npy",
                          mmap_mode="r").shape[0])
    models = {}
    for model in dict.fromkeys(DEFAULT_ROWS[r][0] for r in rows):
        seconds = {}
        for s in seeds:
            seconds[str(s)] = _training_seconds(root, model, s)
        models[model] = {"train_s": seconds,
                         "train_flops": training_flops(model, params, params.data.image_size,
                                                       n_train)}
    return {"arm": arm, "overrides": ARMS[arm]["overrides"], "seeds": seeds,
            "image_size": params.data.image_size, "base_channels": params.model.base_channels,
            "epochs": params.train.epochs, "n_train": n_train, "rows": rows, "models": models,
            "baselines": {"anogan_epochs": params.anogan.epochs,
                          "fanogan_epochs": params.fanogan.epochs,
                          "variant": {m: params.preprocess.variant_of(m) for m in BASELINE_ROWS}}}


SETTINGS = ("overrides", "image_size", "base_channels", "epochs", "n_train", "baselines")


def merge_arm(old: dict, new: dict) -> dict:
    """``new`` (a run of some seeds of an arm) added to the record ``old`` of other seeds of the
    same arm, so that an arm can be run a few seeds at a time and every finished seed committed;
    a seed in both is ``new``'s. SystemExit when the two runs differ in a setting."""
    for key in SETTINGS:
        if old.get(key) != new.get(key):
            raise SystemExit(f"arm {new['arm']}: its record of seeds {old['seeds']} has another "
                             f"{key} ({old.get(key)} vs {new.get(key)}); move that record away "
                             "to run the arm anew")
    merged = {**new, "rows": {}, "models": {}}
    for part in ("rows", "models"):
        for name in dict.fromkeys([*old[part], *new[part]]):  # in the records' order
            a, b = old[part].get(name, {}), new[part].get(name, {})
            merged[part][name] = {k: ({**a.get(k, {}), **b[k]} if isinstance(b.get(k), dict)
                                      else b.get(k, a.get(k)))
                                  for k in dict.fromkeys([*a, *b])}
    runs = [r for r in old.get("runs", [_run_of(old)]) if not set(r["seeds"]) <= set(new["seeds"])]
    merged["runs"] = runs + [_run_of(new)]
    merged["seeds"] = sorted(set(old["seeds"]) | set(new["seeds"]))
    merged["commit"] = ", ".join(dict.fromkeys(r["commit"] for r in merged["runs"]))
    merged["wall_s"] = round(sum(r["wall_s"] for r in merged["runs"]), 1)
    return merged


def _run_of(record: dict) -> dict:
    return {k: record[k] for k in ("seeds", "command", "commit", "wall_s")}


def run_arm(root: Path, arm: str, seeds: list[int], folder: Path, patients: Path | None,
            out_dir: Path) -> dict:
    """Run one arm in the workspace ``root`` and record it in ``out_dir/arms/<arm>.json`` (merged
    with a record of the arm's other seeds, :func:`merge_arm`); put the workspace's params and
    tracked reports back as committed (the next arm starts from the defaults; its outputs stay
    in the DVC cache and run-cache). Returns this run's record."""
    cmd = arm_command(arm, seeds, folder, patients)
    commit = _git(root, "rev-parse", "HEAD")
    if _git(root, "status", "--porcelain", "--untracked-files=no"):
        raise SystemExit(f"{root}: uncommitted changes; an arm runs on a committed tree "
                         "(its record names the commit)")
    path = out_dir / "arms" / f"{arm}.json"
    earlier = json.loads(path.read_text()) if path.is_file() else None
    if earlier is not None and earlier["overrides"] != ARMS[arm]["overrides"]:
        raise SystemExit(f"{path}: seeds {earlier['seeds']} of other overrides "
                         f"({earlier['overrides']}); move it away to run the arm anew")
    print("+", " ".join(cmd), flush=True)
    tic = time.time()
    subprocess.run(cmd, cwd=root, check=True)  # a failure leaves the workspace as it is
    record = read_arm(root, arm, seeds)
    subprocess.run(["git", "checkout", "--", "params.yaml", "dvc.lock", "reports"], cwd=root,
                   check=True)
    record.update({"command": " ".join(cmd), "commit": commit,
                   "wall_s": round(time.time() - tic, 1)})
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged = record if earlier is None else merge_arm(earlier, record)
    except SystemExit as exc:  # keep what was measured beside the record it cannot join
        path = path.with_name(f"{path.name}.unmerged")
        print(f"{exc}; this run is kept in {path}", flush=True)
        merged = record
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return record


# ---------------------------------------------------------------------------------------------
# Collecting the arms


def _mean_sd(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def summarise_arm(record: dict) -> dict:
    """The endpoints of one arm: paired per-seed differences (:data:`PAIRS`), every row's
    validation AUC over seeds, per-class AUCs (seed means of the AUC and of the interval's
    ends), and the cost (Sparse-GAN's training FLOPs; the training minutes of all models the
    arm trained)."""
    rows = record["rows"]
    val = {r: {int(s): v for s, v in e["val_auc"].items()} for r, e in rows.items()}
    pairs = {name: paired_over_seeds(val[a], val[b]) for name, a, b in PAIRS
             if a in val and b in val}
    by_class: dict[str, dict] = {}
    for r, e in rows.items():
        for cls in DISEASES:
            per_seed = [c[cls] for c in e["val_auc_by_class"].values() if cls in c]
            if per_seed:
                by_class.setdefault(r, {})[cls] = {
                    k: float(np.mean([p[k] for p in per_seed])) for k in ("auc", "low", "high")
                } | {"n": per_seed[0]["n"], "seeds": len(per_seed)}
    models = record["models"]
    return {"arm": record["arm"], "overrides": record["overrides"], "commit": record["commit"],
            "seeds": record["seeds"], "epochs": record["epochs"],
            "image_size": record["image_size"], "base_channels": record["base_channels"],
            "sparse_gan_train_tflops": (models["sparse_gan"]["train_flops"] / 1e12
                                        if "sparse_gan" in models else None),
            "baselines": record.get("baselines"),
            "train_flops": {m: v["train_flops"] for m, v in models.items()},
            "train_cpu_minutes": {m: _mean_sd([s / 60 for s in v["train_s"].values()])
                                  for m, v in models.items()},
            "wall_minutes": record["wall_s"] / 60,
            "val_auc": {r: _mean_sd(list(v.values())) for r, v in val.items()},
            "val_auc_per_seed": val,
            "paired_val_auc": pairs, "val_auc_by_class": by_class}


PAPER_TRAIN_IMAGES = 50_140  # OCT2017 v3's normal training scans less 1,000 for validation


def paper_epoch_tflops() -> float:
    """Training compute of one Sparse-GAN epoch at the paper's setting (224x224, base width 64,
    1024x7x7 latent, 50,140 normal training scans), counted as the arms are: the scale of the
    measured arms against the paper's."""
    from ..flops import training_flops
    from ..params import parse_params

    params = parse_params({"data": {"image_size": 224}, "model": {"base_channels": 64},
                           "train": {"epochs": 1}})
    return training_flops("sparse_gan", params, 224, PAPER_TRAIN_IMAGES, batch=2) / 1e12


BASELINE_REFERENCE = "b_raw"


def collect(out_dir: Path) -> dict:
    """``out_dir/results.{json,md}`` and ``scale.png`` from every ``out_dir/arms/*.json``, arms
    in :data:`ARMS` order."""
    files = {p.stem: p for p in (out_dir / "arms").glob("*.json")}
    if not files:
        raise SystemExit(f"{out_dir}/arms: no arm records; run `scripts/scale.py run` first")
    order = [a for a in ARMS if a in files] + sorted(set(files) - set(ARMS))
    arms = {a: summarise_arm(json.loads(files[a].read_text())) for a in order}
    raw = arms.get(BASELINE_REFERENCE)
    for a, s in arms.items():  # each baseline arm against the corners-in default, seed by seed
        if raw is None or a == BASELINE_REFERENCE or s["sparse_gan_train_tflops"] is not None:
            continue
        s["paired_val_auc"] = {
            f"{row}: {a} - {BASELINE_REFERENCE}": paired_over_seeds(
                s["val_auc_per_seed"][row], raw["val_auc_per_seed"][row])
            for row in BASELINE_ROWS if row in s["val_auc"] and row in raw["val_auc"]}
    result = {"what": "validation AUC on the real split (studies/real), 3 training seeds per arm "
                      "unless stated; test never scored", "arms": arms,
              "paper_epoch_tflops": paper_epoch_tflops()}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(result))
    figure(result, out_dir / "scale.png")
    return result


def _pm(mean: float, sd: float, fmt: str = ".3f") -> str:
    """``mean ± sd``; an arm with one seed so far has no sd."""
    return f"{mean:{fmt}} (1 seed)" if np.isnan(sd) else f"{mean:{fmt}} ± {sd:.3f}"


def markdown(result: dict) -> str:
    arms = result["arms"]
    lines = ["# Scale study (real validation split, paired by training seed)", "",
             "Made by `python scripts/scale.py collect` from `studies/scale/arms/*.json`; each arm "
             "one `dvc exp run` (its command and commit are in its record). Cells: mean ± sd "
             "over seeds [min, max], wins = seeds where A > B. TFLOPs: one Sparse-GAN training, "
             "counted; one epoch at the paper's setting (224x224, width 64, 50,140 scans) is "
             f"{result['paper_epoch_tflops']:.0f} TFLOPs. CPU min: training minutes per model "
             "and seed (from the trainings' run records; a machine shared with other jobs "
             "inflates them).", "",
             "| arm | epochs | size | width | Sparse-GAN TFLOPs | CPU min (SG / p2p / AE) | "
             + " | ".join(name for name, _, _ in PAIRS) + " |",
             "|---" * (5 + len(PAIRS)) + "|"]
    scale_arms = {a: s for a, s in arms.items() if s["sparse_gan_train_tflops"] is not None}
    for a, s in scale_arms.items():
        cpu = s["train_cpu_minutes"]
        cells = []
        for name, _, _ in PAIRS:
            d = s["paired_val_auc"].get(name)
            cells.append("-" if d is None else f"{_pm(d['mean'], d['sd'], '+.3f')} "
                         f"[{d['min']:+.3f}, {d['max']:+.3f}] {d['wins']}/{d['n']}")
        lines.append(f"| {a} | {s['epochs']} | {s['image_size']} | {s['base_channels']} | "
                     f"{s['sparse_gan_train_tflops']:.1f} | "
                     + " / ".join(f"{cpu[m]['mean']:.1f}" for m in
                                  ("sparse_gan", "pix2pix", "autoencoder") if m in cpu)
                     + " | " + " | ".join(cells) + " |")
    rows = list(dict.fromkeys(r for s in arms.values() for r in s["val_auc"]))
    lines += ["", "Validation AUC per row (mean ± sd over seeds).", "",
              "| arm | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for a, s in arms.items():
        lines.append(f"| {a} | " + " | ".join(
            _pm(s['val_auc'][r]['mean'], s['val_auc'][r]['sd']) if r in s["val_auc"]
            else "-" for r in rows) + " |")
    lines += ["", "Per-class validation AUC, NORMAL against one disease (seed means of the AUC "
              "and of its 95% patient-bootstrap interval; n = diseased validation scans).", "",
              "| arm | row | " + " | ".join(DISEASES) + " |", "|---|---|---|---|---|"]
    for a, s in arms.items():
        for r, by in s["val_auc_by_class"].items():
            lines.append(f"| {a} | {r} | " + " | ".join(
                f"{by[c]['auc']:.3f} [{by[c]['low']:.3f}, {by[c]['high']:.3f}] (n={by[c]['n']})"
                if c in by else "-" for c in DISEASES) + " |")
    baseline_arms = {a: s for a, s in arms.items() if a not in scale_arms}
    if baseline_arms:
        lines += ["", f"The baselines' own arms (AnoGAN, f-AnoGAN): each against "
                  f"`{BASELINE_REFERENCE}` (registration corners left in, default lengths), "
                  "paired by seed.", "",
                  "| arm | AnoGAN / f-AnoGAN data | AnoGAN / f-AnoGAN epochs | CPU min (AnoGAN / "
                  "f-AnoGAN) | AnoGAN val AUC | f-AnoGAN val AUC | paired differences |",
                  "|---|---|---|---|---|---|---|"]
        for a, s in baseline_arms.items():
            b, cpu, v = s["baselines"], s["train_cpu_minutes"], s["val_auc"]
            diffs = "; ".join(f"{name}: {_pm(d['mean'], d['sd'], '+.3f')} {d['wins']}/{d['n']}"
                              for name, d in s["paired_val_auc"].items()) or "-"
            data = (" / ".join(b["variant"][m] for m in BASELINE_ROWS) if "variant" in b
                    else ("filled" if b["fill_corners"] else "raw"))  # records before bc96318
            lines.append(f"| {a} | {data} | "
                         f"{b['anogan_epochs']} / {b['fanogan_epochs']} | "
                         + " / ".join(f"{cpu[m]['mean']:.1f}" for m in BASELINE_ROWS if m in cpu)
                         + " | " + " | ".join(_pm(v[r]['mean'], v[r]['sd'])
                                              if r in v else "-" for r in BASELINE_ROWS)
                         + f" | {diffs} |")
    return "\n".join(lines) + "\n"


def figure(result: dict, out: Path) -> None:
    """Top: Sparse-GAN minus each ablation (validation AUC, mean ± sd over seeds) against
    Sparse-GAN's training compute (log axis); the training-length arms joined by lines, other
    arms as labelled points. Bottom, same axis: the best row's validation AUC and Sparse-GAN's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = {a: s for a, s in result["arms"].items() if s["sparse_gan_train_tflops"] is not None}
    length = [a for a, s in arms.items() if set(s["overrides"]) == {"train.epochs"}]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    colours = {"Sparse-GAN - pix2pix #2 (latent)": "C0", "Sparse-GAN - pix2pix #1 (image)": "C1",
               "Sparse-GAN - Auto-Encoder": "C2"}
    for name, colour in colours.items():
        xs, ys, es = [], [], []
        for a in length:
            d = arms[a]["paired_val_auc"].get(name)
            if d:
                xs.append(arms[a]["sparse_gan_train_tflops"])
                ys.append(d["mean"])
                es.append(0 if np.isnan(d["sd"]) else d["sd"])
        top.errorbar(xs, ys, yerr=es, color=colour, marker="o", capsize=3, label=name)
        for a, s in arms.items():
            d = s["paired_val_auc"].get(name)
            if a in length or d is None:
                continue
            top.errorbar([s["sparse_gan_train_tflops"]], [d["mean"]],
                         yerr=[0 if np.isnan(d["sd"]) else d["sd"]], color=colour, marker="s",
                         capsize=3, alpha=0.6)
            if name == "Sparse-GAN - pix2pix #2 (latent)":
                top.annotate(a, (s["sparse_gan_train_tflops"], d["mean"]), fontsize=7,
                             xytext=(4, 4), textcoords="offset points")
    for a in length:
        top.annotate(f"{arms[a]['epochs']} ep", (arms[a]["sparse_gan_train_tflops"],
                                                 arms[a]["paired_val_auc"][
                                                     "Sparse-GAN - pix2pix #2 (latent)"]["mean"]),
                     fontsize=7, xytext=(4, -10), textcoords="offset points")
    top.axhline(0, color="k", lw=0.8)
    top.set_ylabel("val AUC difference\n(> 0: Sparse-GAN ahead)")
    top.set_title("Sparse-GAN vs its ablations on real validation scans, paired by seed")
    top.legend(fontsize=8, loc="lower right")
    top.grid(alpha=0.3)
    xs = [s["sparse_gan_train_tflops"] for s in arms.values()]
    best = [max(s["val_auc"].values(), key=lambda v: v["mean"]) for s in arms.values()]
    best_row = [max(s["val_auc"], key=lambda r: s["val_auc"][r]["mean"]) for s in arms.values()]
    sg = [s["val_auc"]["sparse_gan"] for s in arms.values()]
    order = np.argsort(xs)
    bottom.errorbar(np.array(xs)[order], [best[i]["mean"] for i in order],
                    yerr=[np.nan_to_num(best[i]["sd"]) for i in order], marker="o", color="k",
                    linestyle="none", capsize=3, label="best row of the arm")
    for i in order:
        bottom.annotate(best_row[i], (xs[i], best[i]["mean"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    bottom.errorbar(np.array(xs)[order], [sg[i]["mean"] for i in order],
                    yerr=[np.nan_to_num(sg[i]["sd"]) for i in order], marker="o", color="C3",
                    linestyle="none", capsize=3, label="Sparse-GAN")
    bottom.set_xscale("log")
    bottom.set_xlabel("training compute of one Sparse-GAN (TFLOPs, log scale)")
    bottom.set_ylabel("val AUC")
    bottom.legend(fontsize=8, loc="lower right")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, metadata={"Software": None})
    plt.close(fig)
