"""Benchmark of this machine (sparsegan/bench.py): ``make bench`` -> reports/bench.json.

    python scripts/bench.py [--out reports/bench.json] [--pipeline] [--compile] [--quick]
"""

from sparsegan.bench import main

if __name__ == "__main__":
    main()
