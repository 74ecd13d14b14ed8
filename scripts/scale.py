"""The scale study on a real OCT tree (sparsegan/studies/scale.py): run arms, collect them.

    python scripts/scale.py run --folder ../shared/oct_real --arms e120 e60 e60_lsp5
    python scripts/scale.py collect          # studies/scale/results.{json,md}, scale.png

``run`` runs each arm as one ``dvc exp run -n scale-<arm>`` in this repository's workspace
(committed tree only), one after another, and writes ``studies/scale/arms/<arm>.json`` after
each; ``--seeds 0`` runs some seeds of an arm (experiment ``scale-<arm>-s0``), merged into the
record of its other seeds, so a long arm can run a seed at a time, each committed. ``--until
HH:MM`` (local time) skips an arm whose estimated duration (the previous arm's wall time per
seed, scaled by the training compute) would end after it.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from sparsegan.studies.scale import ARMS, collect, markdown, run_arm

ROOT = Path.cwd()


def _cost(arm: str) -> float:
    o = {"train.epochs": "30", "model.base_channels": "16", "data.image_size": "64",
         **ARMS[arm]["overrides"]}
    models = 3 if set(o) <= {"train.epochs", "model.base_channels", "data.image_size"} else 1.4
    return (float(o["train.epochs"]) * float(o["model.base_channels"]) ** 2
            * float(o["data.image_size"]) ** 2 * models)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--folder", type=Path, required=True, help="the real OCT tree")
    r.add_argument("--patients", type=Path, default=ROOT / "studies" / "real" / "patients.csv")
    r.add_argument("--arms", nargs="+", required=True, choices=list(ARMS))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--out", type=Path, default=ROOT / "studies" / "scale")
    r.add_argument("--until", default=None, help="HH:MM: start no arm that would end after it")
    r.add_argument("--estimate-min-per-unit", type=float, default=None,
                   help="minutes per cost unit and seed of the first arm (default: unknown, "
                        "run it)")
    c = sub.add_parser("collect")
    c.add_argument("--out", type=Path, default=ROOT / "studies" / "scale")
    a = ap.parse_args(argv)
    if a.cmd == "collect":
        print(markdown(collect(a.out)))
        return
    if not a.folder.is_dir():
        raise SystemExit(f"--folder {a.folder}: not a folder")
    until = None
    if a.until:
        h, m = map(int, a.until.split(":"))
        until = dt.datetime.now().replace(hour=h, minute=m, second=0, microsecond=0)
    per_unit = a.estimate_min_per_unit
    for arm in a.arms:
        if until is not None and per_unit is not None:
            end = dt.datetime.now() + dt.timedelta(minutes=per_unit * _cost(arm) * len(a.seeds))
            if end > until:
                print(f"skip {arm}: estimated end {end:%H:%M} is after {a.until}", flush=True)
                continue
        record = run_arm(ROOT, arm, a.seeds, a.folder, a.patients if a.patients.is_file()
                         else None, a.out)
        per_unit = record["wall_s"] / 60 / (_cost(arm) * len(a.seeds))
        print(f"done {arm}: {record['wall_s'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
