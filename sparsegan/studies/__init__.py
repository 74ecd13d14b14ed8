"""Studies over the DVC pipeline: each arm or seed set is one ``dvc exp run``; these modules run
them and collect the experiments' outputs into ``studies/<name>/`` (thin entry points in
``scripts/``)."""
