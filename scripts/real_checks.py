"""Rank agreement of Table 1's rows between data sets, and the design-check records
(sparsegan/studies/agreement.py). Validation AUCs only.

    python scripts/real_checks.py --agreement real2:study:synthetic study:real_e60:study:synthetic
    python scripts/real_checks.py --summary          # studies/real/checks.md from checks.jsonl

The design checks that wrote ``studies/real/checks.jsonl`` trained through a path of their own,
now retired: new settings are DVC experiments (``scripts/scale.py``, ``scripts/study.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsegan.studies.agreement import agreement_report, parse_pair, summary

REAL = Path("studies") / "real"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--summary", action="store_true", help="write studies/real/checks.md")
    ap.add_argument("--agreement", nargs="+", metavar="A:B",
                    help="rank agreement of data labels A and B (e.g. real2:synthetic3, "
                         "real2:study:synthetic for a make-study result) -> "
                         "studies/real/agreement.{json,md}")
    a = ap.parse_args()
    if a.summary:
        md = summary(REAL / "checks.jsonl")
        (REAL / "checks.md").write_text(md)
        print(md)
    if a.agreement:
        records = [json.loads(x) for x in (REAL / "checks.jsonl").read_text().splitlines()]
        result, md = agreement_report([parse_pair(p) for p in a.agreement], records)
        (REAL / "agreement.json").write_text(json.dumps(result, indent=1) + "\n")
        (REAL / "agreement.md").write_text(md)
        print(md)
    if not (a.summary or a.agreement):
        ap.error("pass --agreement A:B ... or --summary")


if __name__ == "__main__":
    main()
