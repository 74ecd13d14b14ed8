"""Table 1 over several training seeds, one ``dvc exp run`` (sparsegan/studies/table.py).

    python scripts/study.py run --study synthetic --seeds 0 1 2        # make study
    python scripts/study.py groups --folder ../shared/oct_real        # studies/real/patients.csv
    python scripts/study.py run --folder ../shared/oct_real --seeds 0 1 2   # + studies/real/recipe.yaml
    python scripts/study.py collect --study real                      # results.json / results.md
"""

from sparsegan.studies.table import main

if __name__ == "__main__":
    main()
