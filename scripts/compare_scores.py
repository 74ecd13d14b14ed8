"""What the detectors see of normal scans, synthetic vs real (sparsegan/studies/score_gap.py).

    python scripts/compare_scores.py SYNTH_SCORES REAL_SCORES [--seed 0] [--out studies/real/score_gap.json]
"""

from sparsegan.studies.score_gap import main

if __name__ == "__main__":
    main()
