"""Table 1 over several training seeds through the DVC pipeline: one ``dvc exp run``.

    python scripts/study.py run --study synthetic --seeds 0 1 2        # make study
    python scripts/study.py groups --folder ../shared/oct_real        # studies/real/patients.csv
    python scripts/study.py run --folder ../shared/oct_real --seeds 0 1 2   # + studies/real/recipe.yaml
    python scripts/study.py collect --study real                      # results.json / results.md

``run`` starts one ``dvc exp run --temp -S seeds=[...]`` (every model trained once per seed, every
row scored, calibrated and evaluated per seed, the report's mean and spread over the seeds);
with ``--folder``, on that real tree with the split rule of :mod:`sparsegan.studies.real`
(``data.source=folder``; validation from the tree's ``train/``, test = its ``test/``) and the
params of the real-data recipe (``studies/real/recipe.yaml``, chosen on validation). The split
(``data.split.seed``) is the same for every seed, so the seeds differ by training only. The
experiment is a normal DVC experiment (``dvc exp show``), logged to MLflow as one parent run
with a child per (model, seed); its ``reports/metrics.json`` is read back from the experiment's
commit into ``studies/<name>/metrics.json``. ``collect`` turns that file into
``results.json`` / ``results.md``: per row the mean, sd and min-max over seeds, the per-seed
test AUCs with their patient-bootstrap intervals, and paired per-seed differences between rows
(:func:`sparsegan.stats.paired_over_seeds`).

``groups`` writes the ``patients.csv`` of ``../shared/oct_real``-like trees: OCT2017 names carry
their patient (the folder source reads it itself); renamed files ``<prefix>_<n>.<ext>`` are
numbered in the original (patient-sorted) order, so each run of 20 consecutive numbers is taken
as one group (its README: near-duplicate scans are neighbours); other names stay unknown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path

from ..data import IMAGE_EXTENSIONS
from ..evaluate import PAPER_TABLE1
from ..spec import DEFAULT_ROWS
from ..stats import paired_over_seeds
from .real import RECIPE, check_tree, real_overrides, recipe_overrides

ROOT = Path.cwd()  # the repository: the scripts run from its root

RUN_OF = 20
_RENAMED = re.compile(r"^(?P<prefix>[A-Za-z]+(?:_[A-Za-z]+)*)_(?P<n>\d+)\.[A-Za-z]+$")

ROWS = list(DEFAULT_ROWS)
SUMMARY_METRICS = ("val_auc", "test_auc", "test_accuracy", "test_sensitivity",
                   "test_specificity", "test_f1", "test_average_precision", "phi")


def write_groups(folder: Path, out: Path) -> dict[str, int]:
    """``patients.csv`` (file relative to ``folder``, patient) for the renamed files."""
    rows, counts = [], {"grouped": 0, "left": 0}
    for split in ("train", "test", "val"):
        for cls_dir in sorted((folder / split).glob("*")) if (folder / split).is_dir() else []:
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                m = _RENAMED.match(f.name)
                if m:
                    rel = f.relative_to(folder).as_posix()
                    rows.append((rel, f"{m['prefix'].lower()}:{int(m['n']) // RUN_OF}"))
                    counts["grouped"] += 1
                else:
                    counts["left"] += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("file,patient\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return counts


def _exp_ref(name: str) -> str:
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.split()
    hits = [r for r in refs if r.rsplit("/", 1)[-1] == name]
    if not hits:
        raise SystemExit(f"experiment {name!r} not found (git refs/exps); did `dvc exp run` fail?")
    return hits[-1]


def run_study(folder: Path | None, patients: Path | None, seeds: list[int], study: str,
              extra: list[str], recipe: Path | None = None) -> None:
    """One ``dvc exp run --temp`` named ``study`` over ``seeds`` (on a real ``folder``, with
    the split rule and the ``recipe``'s params; an ``extra`` ``key=value`` wins over the
    recipe); its metrics.json to ``studies/<study>/metrics.json`` with the command's overrides."""
    overrides = {"seeds": "[" + ",".join(map(str, seeds)) + "]"}
    if folder is not None:
        overrides.update(real_overrides(folder, patients))
        if recipe is not None:
            mine = {e.partition("=")[0] for e in extra}
            overrides.update({k: v for k, v in recipe_overrides(recipe).items() if k not in mine})
    out_dir = ROOT / "studies" / study
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dvc", "exp", "remove", study], cwd=ROOT, capture_output=True)
    cmd = ["dvc", "exp", "run", "--temp", "-n", study]
    for k, v in overrides.items():
        cmd += ["-S", f"{k}={v}"]
    for e in extra:
        cmd += ["-S", e]
    print("+", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code:
        raise SystemExit(f"error: the study's `dvc exp run` failed (exit {code}); its message "
                         f"is above")
    ref = _exp_ref(study)
    metrics = json.loads(subprocess.run(["git", "show", f"{ref}:reports/metrics.json"], cwd=ROOT,
                                        capture_output=True, text=True, check=True).stdout)
    record = {"seeds": seeds, "experiment": study, "command": " ".join(cmd),
              "overrides": overrides, "extra": extra, "metrics": metrics}
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")


def collect(study: str, studies_dir: Path = ROOT / "studies") -> dict:
    """``<studies_dir>/<study>/results.{json,md}`` from its ``metrics.json`` (see the module doc)."""
    out_dir = studies_dir / study
    path = out_dir / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; run `scripts/study.py run --study {study}` first")
    record = json.loads(path.read_text())
    metrics = record["metrics"]
    rows = [r for r in ROWS if r in metrics]
    seeds = [int(s) for s in record["seeds"]]
    per_seed = {r: {s: metrics[r]["seeds"][str(s)] for s in seeds} for r in rows}
    summary = {r: {k: {"mean": metrics[r][k], **metrics[r]["spread"][k], "n": len(seeds)}
                   for k in SUMMARY_METRICS if k in metrics[r]["spread"]} for r in rows}

    def paired(metric: str) -> dict[str, dict]:
        def by_seed(row: str) -> dict[int, float]:
            return {s: m[metric] for s, m in per_seed[row].items()}
        return {f"{a} - {b}": paired_over_seeds(by_seed(a), by_seed(b))
                for i, a in enumerate(rows) for b in rows[i + 1:]}

    result = {"seeds": seeds, "experiment": record["experiment"], "command": record["command"],
              "overrides": record["overrides"], "extra": record["extra"],
              "summary": summary, "paired_test_auc": paired("test_auc"),
              "paired_val_auc": paired("val_auc"),
              "vs_sparse_gan": {r: {k[len("vs_sparse_gan_"):]: v for k, v in metrics[r].items()
                                    if k.startswith("vs_sparse_gan_")} for r in rows
                                if r != "sparse_gan"},
              "per_seed": {r: {str(s): {k: m[k] for k in m if k in SUMMARY_METRICS
                                        or k.startswith(("test_auc_ci", "test_accuracy_ci",
                                                         "test_sensitivity_ci",
                                                         "test_specificity_ci"))
                                        or k in ("test_patients",)}
                               for s, m in per_seed[r].items()} for r in rows}}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(result))
    return result


def _name(row: str) -> str:
    return PAPER_TABLE1[row][0] if row in PAPER_TABLE1 else f"{row} (ablation)"


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"`{result['command']}`", "",
             f"Training seeds {', '.join(map(str, seeds))} (n = {len(seeds)}); each cell: mean "
             f"± sd over seeds [min-max].", "",
             "| method | val AUC | test AUC | test Acc | test Sen | test Spe |",
             "|---|---|---|---|---|---|"]
    for row, stats in result["summary"].items():
        cells = []
        for k in ("val_auc", "test_auc", "test_accuracy", "test_sensitivity", "test_specificity"):
            s = stats[k]
            cells.append(f"{s['mean']:.3f} ± {s['sd']:.3f} [{s['min']:.3f}-{s['max']:.3f}]")
        lines.append(f"| {_name(row)} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed: test AUC (95% bootstrap interval over test patients/groups), val AUC.", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for row, by_seed in result["per_seed"].items():
        cells = [f"{m['test_auc']:.3f} ({m['test_auc_ci_low']:.3f}-{m['test_auc_ci_high']:.3f}); "
                 f"val {m['val_auc']:.3f}" for m in (by_seed[str(s)] for s in seeds)]
        lines.append(f"| {_name(row)} | " + " | ".join(cells) + " |")
    lines += ["", "Sparse-GAN against each row: difference of the seed-mean test AUCs with the 95% "
              "interval and p-value of the paired bootstrap over test patients and seeds.", "",
              "| row | Sparse-GAN - row | 95% interval | p |", "|---|---|---|---|"]
    for row, d in result["vs_sparse_gan"].items():
        lines.append(f"| {_name(row)} | {d['delta_auc']:+.3f} | [{d['delta_auc_ci_low']:+.3f}, "
                     f"{d['delta_auc_ci_high']:+.3f}] | {d['p_value']:.3f} |")
    lines += ["", "Paired over seeds (row A - row B, same seed): mean ± sd of the per-seed test "
              "AUC difference [min-max], seeds A won.", "",
              "| A - B | test AUC diff | A won | val AUC diff |", "|---|---|---|---|"]
    for pair, d in result["paired_test_auc"].items():
        v = result["paired_val_auc"][pair]
        lines.append(f"| {pair} | {d['mean']:+.3f} ± {d['sd']:.3f} [{d['min']:+.3f}, "
                     f"{d['max']:+.3f}] | {d['wins']}/{d['n']} | {v['mean']:+.3f} ± {v['sd']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("groups")
    g.add_argument("--folder", type=Path, required=True)
    g.add_argument("--out", type=Path, default=ROOT / "studies" / "real" / "patients.csv")
    r = sub.add_parser("run")
    r.add_argument("--folder", type=Path, default=None,
                   help="a real OCT tree (data.source=folder); without it the synthetic default")
    r.add_argument("--patients", type=Path, default=ROOT / "studies" / "real" / "patients.csv")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--study", default="real")
    r.add_argument("--recipe", default=str(RECIPE),
                   help=f"with --folder: the params of the real-data recipe (default {RECIPE}, "
                        f"chosen on real validation scans); \"\": the params.yaml defaults")
    r.add_argument("-S", dest="extra", action="append", default=[],
                   help="another param override, as dvc exp run -S (wins over the recipe)")
    c = sub.add_parser("collect")
    c.add_argument("--study", default="real")
    a = ap.parse_args(argv)
    if a.cmd == "groups":
        if not a.folder.is_dir():
            raise SystemExit(f"--folder {a.folder}: not a folder")
        print(write_groups(a.folder, a.out), "->", a.out)
    elif a.cmd == "run":
        if a.folder is not None:
            check_tree(a.folder)
        if a.folder is not None and not a.patients.is_file():
            raise SystemExit(f"{a.patients}: not found; run `scripts/study.py groups` first")
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        run_study(a.folder, a.patients if a.folder else None, a.seeds, a.study, a.extra,
                  Path(a.recipe) if a.recipe else None)
        print(markdown(collect(a.study)))
    else:
        print(markdown(collect(a.study)))

