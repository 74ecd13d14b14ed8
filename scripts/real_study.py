"""Table 1 on a real OCT tree over several training seeds, through the DVC pipeline.

    python scripts/real_study.py groups --folder ../shared/oct_real   # studies/real/patients.csv
    python scripts/real_study.py run --folder ../shared/oct_real --seeds 0 1 2
    python scripts/real_study.py collect                               # results.json / results.md

``run`` starts one ``dvc exp run --temp`` per training seed (``-S seed=<s>``) with the real-data
params of :data:`REAL_PARAMS` (``data.source=folder``; validation from the tree's ``train/``, test
= its ``test/``); the split (``data.split.seed``) is the same for every seed, so the seeds differ
by training only. Each experiment is a normal DVC experiment (``dvc exp show``), logged to MLflow;
its ``reports/metrics.json`` is read back from the experiment's commit and written to
``studies/<name>/seed<s>.json``. ``collect`` summarises those files: per row the mean, sd and
min-max over seeds of every metric, and paired per-seed differences between rows
(:func:`sparsegan.stats.over_seeds`, :func:`sparsegan.stats.paired_over_seeds`).

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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparsegan.data import IMAGE_EXTENSIONS  # noqa: E402
from sparsegan.evaluate import PAPER_TABLE1  # noqa: E402
from sparsegan.stats import over_seeds, paired_over_seeds  # noqa: E402

RUN_OF = 20
_RENAMED = re.compile(r"^(?P<prefix>[A-Za-z]+(?:_[A-Za-z]+)*)_(?P<n>\d+)\.[A-Za-z]+$")

# The real-data split (also used by scripts/real_checks.py): every scan of train/ that is not
# NORMAL goes to validation (training never sees them anyway), with 300 NORMAL scans; test/ is
# the test set.
REAL_SPLIT = {"val_normal": 300, "val_per_disease": {"CNV": 305, "DME": 36, "DRUSEN": 28}}
REAL_PARAMS = {  # the same as `dvc exp run -S` overrides
    "data.source": "folder",
    "data.split.val_normal": str(REAL_SPLIT["val_normal"]),
    "data.split.val_per_disease": "{" + ",".join(
        f"{c}:{n}" for c, n in REAL_SPLIT["val_per_disease"].items()) + "}",
}
ROWS = list(PAPER_TABLE1)
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


def run_seeds(folder: Path, patients: Path, seeds: list[int], study: str,
              extra: list[str]) -> None:
    out_dir = ROOT / "studies" / study
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = {**REAL_PARAMS, "data.folder": str(folder.resolve()),
                 "data.patients": str(patients.resolve())}
    for seed in seeds:
        name = f"{study}-s{seed}"
        subprocess.run(["dvc", "exp", "remove", name], cwd=ROOT, capture_output=True)
        cmd = ["dvc", "exp", "run", "--temp", "-n", name, "-S", f"seed={seed}"]
        for k, v in overrides.items():
            cmd += ["-S", f"{k}={v}"]
        for e in extra:
            cmd += ["-S", e]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        ref = _exp_ref(name)
        metrics = json.loads(subprocess.run(["git", "show", f"{ref}:reports/metrics.json"],
                                            cwd=ROOT, capture_output=True, text=True,
                                            check=True).stdout)
        record = {"seed": seed, "experiment": name, "overrides": overrides, "extra": extra,
                  "metrics": metrics}
        (out_dir / f"seed{seed}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"[study] seed {seed}: " + ", ".join(
            f"{v} {m.get('test_auc', float('nan')):.3f}" for v, m in metrics.items()
            if isinstance(m, dict) and "test_auc" in m), flush=True)


def collect(study: str) -> dict:
    out_dir = ROOT / "studies" / study
    records = [json.loads(p.read_text()) for p in sorted(out_dir.glob("seed*.json"))]
    if not records:
        raise SystemExit(f"{out_dir}: no seed*.json; run `scripts/real_study.py run` first")
    rows = [r for r in ROWS if all(r in rec["metrics"] for rec in records)]
    per_seed = {r: {rec["seed"]: rec["metrics"][r] for rec in records} for r in rows}
    summary = {r: over_seeds({s: {k: m[k] for k in m if isinstance(m[k], (int, float))}
                              for s, m in per_seed[r].items()}) for r in rows}
    def paired(metric: str) -> dict[str, dict]:
        def by_seed(row: str) -> dict[int, float]:
            return {s: m[metric] for s, m in per_seed[row].items()}
        return {f"{a} - {b}": paired_over_seeds(by_seed(a), by_seed(b))
                for i, a in enumerate(rows) for b in rows[i + 1:]}

    result = {"seeds": [rec["seed"] for rec in records],
              "experiments": [rec["experiment"] for rec in records],
              "overrides": records[0]["overrides"], "extra": records[0]["extra"],
              "summary": summary, "paired_test_auc": paired("test_auc"),
              "paired_val_auc": paired("val_auc"),
              "per_seed": {r: {str(s): {k: m[k] for k in m if k in SUMMARY_METRICS
                                        or k.startswith(("test_auc_ci", "test_accuracy_ci",
                                                         "test_sensitivity_ci",
                                                         "test_specificity_ci"))
                                        or k in ("test_patients",)}
                               for s, m in per_seed[r].items()} for r in rows}}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"Training seeds {', '.join(map(str, seeds))} (n = {len(seeds)}); each cell: mean "
             f"± sd over seeds [min-max].", "",
             "| method | val AUC | test AUC | test Acc | test Sen | test Spe |",
             "|---|---|---|---|---|---|"]
    for row, stats in result["summary"].items():
        cells = []
        for k in ("val_auc", "test_auc", "test_accuracy", "test_sensitivity", "test_specificity"):
            s = stats[k]
            cells.append(f"{s['mean']:.3f} ± {s['sd']:.3f} [{s['min']:.3f}-{s['max']:.3f}]")
        lines.append(f"| {PAPER_TABLE1[row][0]} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed: test AUC (95% bootstrap interval over test patients/groups), val AUC.", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for row, by_seed in result["per_seed"].items():
        cells = [f"{m['test_auc']:.3f} ({m['test_auc_ci_low']:.3f}-{m['test_auc_ci_high']:.3f}); "
                 f"val {m['val_auc']:.3f}" for m in (by_seed[str(s)] for s in seeds)]
        lines.append(f"| {PAPER_TABLE1[row][0]} | " + " | ".join(cells) + " |")
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
    r.add_argument("--folder", type=Path, required=True)
    r.add_argument("--patients", type=Path, default=ROOT / "studies" / "real" / "patients.csv")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--study", default="real")
    r.add_argument("-S", dest="extra", action="append", default=[],
                   help="another param override, as dvc exp run -S")
    c = sub.add_parser("collect")
    c.add_argument("--study", default="real")
    a = ap.parse_args(argv)
    if a.cmd == "groups":
        if not a.folder.is_dir():
            raise SystemExit(f"--folder {a.folder}: not a folder")
        print(write_groups(a.folder, a.out), "->", a.out)
    elif a.cmd == "run":
        if not a.patients.is_file():
            raise SystemExit(f"{a.patients}: not found; run `scripts/real_study.py groups` first")
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        run_seeds(a.folder, a.patients, a.seeds, a.study, a.extra)
        collect(a.study)
    else:
        print(markdown(collect(a.study)))


if __name__ == "__main__":
    main()
